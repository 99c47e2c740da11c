"""Causal-LM fine-tuning (SFT) with TRL's ``SFTTrainer`` and any PEFT config of this package.

The trainer gets our config through ``peft_config=`` exactly as a user would pass a ``LoraConfig``;
training-time work of the methods (PAC-Bayes gradients, pruning, allocation, AutoLoRA's β) runs
by itself through the optimizer step hooks. The metric is the evaluation loss and its perplexity
(and TRL's mean token accuracy, when it reports one).
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import torch

from peft_lowrank_ext.train.data import TEXT, TextCorpus
from peft_lowrank_ext.train.measure import StepTimes, count_parameters, reset_peak_rss
from peft_lowrank_ext.train.models import fill_target_modules, load_causal_lm, quiet_transformers, set_seed
from peft_lowrank_ext.train.run import TrainingConfig, TrainResult, make_result, run_extra


def train_causal_lm(
    peft_config,
    corpus: TextCorpus,
    config: TrainingConfig | None = None,
    *,
    model: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    method: str = "adapter",
    callbacks: list | None = None,
    prepare=None,
) -> TrainResult:
    """Fine-tune a causal LM on ``corpus.train`` with ``SFTTrainer(peft_config=...)``; evaluate on ``corpus.eval``.

    ``prepare(peft_model, tokenizer)``, if given, runs once the trainer has wrapped the model and
    before training (AutoLoRA attaches its held-out data there). ``accuracy`` is TRL's mean token
    accuracy on the evaluation texts (NaN if not reported); ``extra`` holds the perplexity.
    """
    from trl import SFTConfig, SFTTrainer

    config = config or TrainingConfig()
    set_seed(config.seed)
    net, tokenizer = load_causal_lm(model)
    fill_target_modules(peft_config, net)
    timer = StepTimes()
    steps = config.total_steps(len(corpus.train))
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(
            output_dir=scratch, num_train_epochs=config.epochs, max_steps=config.max_steps or -1,
            per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.eval_batch_size,
            learning_rate=config.lr, warmup_steps=int(config.warmup_ratio * steps), weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm or 0.0, lr_scheduler_type="linear", max_length=config.max_length,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
            seed=config.seed, data_seed=config.seed, disable_tqdm=not config.progress, dataset_text_field=TEXT,
            dataloader_num_workers=0, gradient_checkpointing=False,
        )
        set_seed(config.seed)
        with quiet_transformers():
            trainer = SFTTrainer(model=net, args=args, train_dataset=corpus.train, eval_dataset=corpus.eval,
                                 processing_class=tokenizer, peft_config=peft_config,
                                 callbacks=[timer.as_callback(), *(callbacks or [])])
        peft_model = trainer.model
        params = count_parameters(peft_model)
        if prepare is not None:
            prepare(peft_model, tokenizer)
        reset_peak_rss()
        t0 = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - t0
        metrics = trainer.evaluate()

    eval_loss = float(metrics.get("eval_loss", float("nan")))
    curve = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    extra = {"task": "causal-lm", "perplexity": math.exp(eval_loss) if eval_loss < 50 else float("inf"),
             **run_extra(peft_config, config, len(corpus.train), len(corpus.eval))}
    return make_result(
        peft_model, config, method=method, params=params,
        accuracy=float(metrics.get("eval_mean_token_accuracy", float("nan"))), eval_loss=eval_loss,
        optimizer=trainer.optimizer, train_time_s=train_time, step_times=timer,
        steps=max(1, trainer.state.global_step), epochs=float(trainer.state.epoch or 0.0),
        final_train_loss=curve[-1][1] if curve else float("nan"), head_lr=config.lr, extra=extra,
        loss_curve=curve, output_dir=output_dir,
    )


__all__ = ["train_causal_lm"]
