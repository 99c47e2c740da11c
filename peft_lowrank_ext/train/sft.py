"""Causal-LM fine-tuning (SFT) with TRL's ``SFTTrainer`` and any PEFT config of this package.

The trainer gets our config through ``peft_config=`` exactly as a user would pass a ``LoraConfig``;
training-time work of the methods (PAC-Bayes gradients, pruning, allocation, AutoLoRA's β) runs
by itself through the optimizer step hooks. The metric is the evaluation loss and its perplexity
(and TRL's mean token accuracy, when it reports one).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from peft_lowrank_ext.train.data import TEXT, TextCorpus
from peft_lowrank_ext.train.loop import (
    ADAPTER_FILE,
    TrainingConfig,
    TrainResult,
    _quiet_transformers,
    count_parameters,
    model_load_error,
    optimizer_state_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    set_seed,
)


def load_causal_lm(model: str | os.PathLike | None):
    """``AutoModelForCausalLM`` and its tokenizer (pad token = EOS where it has none)."""
    if model is None:
        raise ValueError("model (--model): --task causal-lm needs --model (a local causal-LM folder or hub id); "
                         "the packaged MiniLM is an encoder and cannot generate text")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(model)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            net = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise model_load_error(path, "a causal-LM model and tokenizer", e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"model (--model): the tokenizer of {path!r} has no pad, eos or unk token to pad with")
    return net, tokenizer


def lm_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Ready causal-LM batches (labels = input ids, padding ignored), e.g. AutoLoRA's held-out data."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


class _StepTimer:
    """A ``TrainerCallback`` measuring each optimizer step (forward, backward and update)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times: list[float] = []
                self._t0 = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._t0)

        return Timer()


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
    if getattr(peft_config, "target_modules", None) is None:
        from peft_lowrank_ext.train.loop import default_target_modules

        peft_config.target_modules = default_target_modules(net)
    timer = _StepTimer()
    steps = config.max_steps or max(1, math.ceil(config.epochs * math.ceil(len(corpus.train) / config.batch_size)))
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
        with _quiet_transformers():
            trainer = SFTTrainer(model=net, args=args, train_dataset=corpus.train, eval_dataset=corpus.eval,
                                 processing_class=tokenizer, peft_config=peft_config,
                                 callbacks=[timer, *(callbacks or [])])
        peft_model = trainer.model
        trainable, total = count_parameters(peft_model)
        if prepare is not None:
            prepare(peft_model, tokenizer)
        reset_peak_rss()
        t0 = time.perf_counter()
        trainer.train()
        train_time = time.perf_counter() - t0
        metrics = trainer.evaluate()
        opt_bytes = optimizer_state_bytes(trainer.optimizer) if trainer.optimizer is not None else 0
        curve = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
        save_dir = Path(output_dir) if output_dir is not None else Path(scratch) / "adapter"
        save_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(save_dir)
        adapter_bytes = (save_dir / ADAPTER_FILE).stat().st_size

    eval_loss = float(metrics.get("eval_loss", float("nan")))
    steps = max(1, trainer.state.global_step)
    extra: dict[str, Any] = {
        "task": "causal-lm",
        "perplexity": math.exp(eval_loss) if eval_loss < 50 else float("inf"),
        "target_modules": sorted(peft_config.target_modules)
        if isinstance(peft_config.target_modules, (list, set, tuple)) else peft_config.target_modules,
        "train_rows": len(corpus.train), "eval_rows": len(corpus.eval), "batch_size": config.batch_size,
        "max_length": config.max_length, "seed": config.seed,
    }
    result = TrainResult(
        method=method,
        accuracy=float(metrics.get("eval_mean_token_accuracy", float("nan"))),
        eval_loss=eval_loss,
        trainable_params=trainable,
        total_params=total,
        adapter_bytes=adapter_bytes,
        optimizer_state_bytes=opt_bytes,
        train_time_s=train_time,
        time_per_step_s=train_time / steps,
        median_step_s=statistics.median(timer.times) if timer.times else train_time / steps,
        steps=steps,
        epochs=float(trainer.state.epoch or 0.0),
        lr=config.lr,
        head_lr=config.lr,
        final_train_loss=curve[-1][1] if curve else float("nan"),
        peak_rss_bytes=peak_rss_bytes(),
        adapter_dir=str(save_dir) if output_dir is not None else None,
        extra=extra,
        loss_curve=curve,
    )
    result.peft_model = peft_model
    return result


__all__ = ["lm_batches", "load_causal_lm", "train_causal_lm"]
