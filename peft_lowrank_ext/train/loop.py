"""A plain PyTorch fine-tuning loop for sequence classification with any PEFT config.

:func:`train_classifier` loads a (local) model with a fresh classification head
(:mod:`~peft_lowrank_ext.train.models`), wraps it with ``peft.get_peft_model``, trains it with AdamW and
a linear warm-up/decay schedule, evaluates accuracy, saves the adapter and returns a
:class:`~peft_lowrank_ext.train.run.TrainResult` with the numbers the CLI compares (measured by
:mod:`~peft_lowrank_ext.train.measure`, assembled by :func:`~peft_lowrank_ext.train.run.make_result`).

With ``task_type="SEQ_CLS"`` PEFT makes the classification head (``classifier``/``score``) trainable
and saves it with the adapter, so the head is counted in the trainable parameters and the file size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import torch

from peft_lowrank_ext.train.data import TextClassificationData, collate, encode_rows, row_batches
from peft_lowrank_ext.train.measure import StepTimes, adapter_param_norm, count_parameters, reset_peak_rss
from peft_lowrank_ext.train.models import set_seed, wrap_classifier
from peft_lowrank_ext.train.run import TrainingConfig, TrainResult, make_result, run_extra


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on encoded ``rows``."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for chunk in row_batches(rows, batch_size):
        batch = collate(tokenizer, chunk)
        out = model(**batch)
        logits = out.logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        n += len(chunk)
    model.train(was_training)
    return correct / max(n, 1), loss_sum / max(n, 1)


def head_and_adapter_groups(model: torch.nn.Module, lr: float, head_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: the adapter at ``lr``, PEFT's ``modules_to_save`` copies (the new head) at ``head_lr``.

    Methods with very few trainable numbers (RLoRA's ``z``) want a much larger learning rate than the
    freshly initialised head.
    """
    adapter, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if "modules_to_save" in name else adapter).append(p)
    groups = [{"params": adapter, "lr": lr}]
    if head:
        groups.append({"params": head, "lr": head_lr if head_lr is not None else lr})
    return [g for g in groups if g["params"]]


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 to the base lr over ``warmup_steps``, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_classifier(
    peft_config,
    data: TextClassificationData,
    config: TrainingConfig | None = None,
    *,
    model: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    method: str | None = None,
    evaluate_before: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` (default: the packaged MiniLM) on ``data`` with ``peft_config``.

    ``peft_config.target_modules=None`` is filled with PEFT's LoRA defaults for the architecture so
    that different methods compared on one model adapt the same modules. The adapter is saved to
    ``output_dir`` (or a temporary folder that is removed) and the size of its
    ``adapter_model.safetensors`` is reported.
    """
    config = config or TrainingConfig()
    method = method or str(getattr(peft_config, "peft_type", type(peft_config).__name__)).split(".")[-1].lower()
    peft_model, tokenizer = wrap_classifier(peft_config, model, data.num_labels, config.seed)
    return fit(peft_model, tokenizer, data, config, method=method, output_dir=output_dir,
               evaluate_before=evaluate_before)


def fit(
    peft_model: torch.nn.Module,
    tokenizer,
    data: TextClassificationData,
    config: TrainingConfig | None = None,
    *,
    method: str = "adapter",
    output_dir: str | os.PathLike | None = None,
    evaluate_before: bool = False,
) -> TrainResult:
    """Train an already wrapped ``PeftModel`` for sequence classification, evaluate and save it.

    Only parameters with ``requires_grad`` are optimised; everything else stays as it was.
    """
    config = config or TrainingConfig()
    peft_config = peft_model.peft_config[peft_model.active_adapter]
    params_count = count_parameters(peft_model)
    if params_count[0] == 0:
        raise ValueError(f"{method}: the PEFT config left no trainable parameters")
    set_seed(config.seed)

    train_rows = encode_rows(tokenizer, data.train, config.max_length)
    eval_rows = encode_rows(tokenizer, data.eval, config.max_length)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = config.total_steps(len(train_rows))
    warmup = int(config.warmup_ratio * total_steps)

    reset_peak_rss()  # peak memory of this run only (the model is already resident)
    initial_acc = None
    if evaluate_before:
        initial_acc, _ = evaluate(peft_model, tokenizer, eval_rows, config.eval_batch_size)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    groups = head_and_adapter_groups(peft_model, config.lr, config.head_lr)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    gen = torch.Generator().manual_seed(config.seed)

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc=f"{method} training", unit="step", disable=not config.progress,
               file=sys.stderr, dynamic_ncols=True)
    peft_model.train()
    timer = StepTimes()
    recent: list[float] = []
    curve: list[tuple[int, float]] = []
    last_loss = float("nan")
    step = 0
    t_start = time.perf_counter()
    while step < total_steps:
        for chunk in row_batches(train_rows, config.batch_size, gen):
            if step >= total_steps:
                break
            timer.start()
            batch = collate(tokenizer, chunk)
            out = peft_model(**batch)
            loss = out.loss
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()  # RLoRA's PAC-Bayes term is added by an optimizer pre-step hook
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            timer.stop()
            step += 1
            recent.append(loss.item())
            curve.append((step, recent[-1]))
            if len(recent) >= config.log_every or step == total_steps:
                last_loss = sum(recent) / len(recent)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
                recent.clear()
            bar.update(1)
    train_time = time.perf_counter() - t_start
    bar.close()

    accuracy, eval_loss = evaluate(peft_model, tokenizer, eval_rows, config.eval_batch_size)
    extra = run_extra(peft_config, config, len(train_rows), len(eval_rows))
    extra["adapter_param_norm"] = adapter_param_norm(peft_model)  # L2 norm of the trained adapter tensors
    summary = getattr(peft_model.base_model, "training_summary", None)
    if summary is not None:  # each method reports its own extras (RLoRA: the PAC-Bayes terms)
        extra.update(summary(peft_model.active_adapter))
    return make_result(
        peft_model, config, method=method, params=params_count, accuracy=accuracy, eval_loss=eval_loss,
        optimizer=optimizer, train_time_s=train_time, step_times=timer, steps=step, epochs=step / steps_per_epoch,
        final_train_loss=last_loss, head_lr=config.head_lr if config.head_lr is not None else config.lr,
        extra=extra, loss_curve=curve, output_dir=output_dir, initial_accuracy=initial_acc,
    )


__all__ = ["evaluate", "fit", "head_and_adapter_groups", "linear_schedule", "train_classifier"]
