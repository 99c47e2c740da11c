"""A plain PyTorch fine-tuning loop for sequence classification with any PEFT config.

:func:`train_classifier` loads a (local) model with a fresh classification head
(:mod:`~peft_lowrank_ext.train.models`), wraps it with ``peft.get_peft_model``, trains it with AdamW and
a linear warm-up/decay schedule, evaluates accuracy (regression: Pearson/Spearman and the mean squared
error, with a one-output head and ``problem_type="regression"``), saves the adapter and returns a
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
from peft_lowrank_ext.train.measure import (StepTimes, adapter_param_norm, count_parameters, pearson, reset_peak_rss,
                                            spearman)
from peft_lowrank_ext.train.models import set_seed, wrap_classifier
from peft_lowrank_ext.train.run import TrainingConfig, TrainResult, make_result, run_extra


def _on_device(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``batch`` with its tensors on the device of ``model``'s parameters."""
    device = next(model.parameters()).device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on encoded ``rows``."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for chunk in row_batches(rows, batch_size):
        batch = _on_device(collate(tokenizer, chunk), model)
        out = model(**batch)
        logits = out.logits.float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        n += len(chunk)
    model.train(was_training)
    return correct / max(n, 1), loss_sum / max(n, 1)


@torch.no_grad()
def predict_scores(model: torch.nn.Module, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> list[float]:
    """The one-output head's predictions on encoded ``rows`` (regression), in order."""
    was_training = model.training
    model.eval()
    preds: list[float] = []
    for chunk in row_batches(rows, batch_size):
        batch = collate(tokenizer, chunk)
        batch.pop("labels")
        preds += model(**_on_device(batch, model)).logits.float().reshape(-1).tolist()
    model.train(was_training)
    return preds


def evaluate_regression(model: torch.nn.Module, tokenizer, rows: list[dict[str, Any]],
                        batch_size: int) -> dict[str, float]:
    """``{"mse", "pearson", "spearman"}`` of ``model`` (one output) against the float labels of ``rows``
    (correlations are NaN when the predictions or labels are constant)."""
    preds = predict_scores(model, tokenizer, rows, batch_size)
    labels = [float(r["labels"]) for r in rows]
    if len(preds) != len(labels):
        raise ValueError(f"regression: the model gives {len(preds)} outputs for {len(labels)} rows; it needs a "
                         "one-output head (num_labels=1)")
    mse = sum((p - y) ** 2 for p, y in zip(preds, labels)) / max(len(labels), 1)
    two = len(labels) >= 2
    return {"mse": mse, "pearson": pearson(preds, labels) if two else float("nan"),
            "spearman": spearman(preds, labels) if two else float("nan")}


def prepare_head(peft_model: torch.nn.Module, data: TextClassificationData) -> str:
    """Check that the classification head fits ``data`` (regression: one output, ``problem_type``
    set to ``"regression"`` so that the loss is MSE); returns the task."""
    task = getattr(data, "task", "classification")
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    cfg = getattr(base, "config", None)
    want = 1 if task == "regression" else data.num_labels
    have = getattr(cfg, "num_labels", want)
    if have != want:
        raise ValueError(f"num_labels: the model's classification head has {have} output(s), the {task} data needs "
                         f"{want}; build the model with num_labels={want}")
    if cfg is not None:
        if task == "regression":
            cfg.problem_type = "regression"
        elif cfg.problem_type == "regression":
            raise ValueError("task: the model is set up for regression (problem_type='regression'), the data is "
                             "classification")
    return task


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

    Only parameters with ``requires_grad`` are optimised; everything else stays as it was. For
    regression data (``data.task == "regression"``) the head must have one output; the loss is MSE and
    the result reports Pearson/Spearman (``accuracy`` is NaN).
    """
    config = config or TrainingConfig()
    peft_config = peft_model.peft_config[peft_model.active_adapter]
    task = prepare_head(peft_model, data)
    if config.device is not None:
        peft_model.to(config.device)
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
    initial_acc = initial_reg = None
    if evaluate_before and task == "regression":
        initial_reg = evaluate_regression(peft_model, tokenizer, eval_rows, config.eval_batch_size)
    elif evaluate_before:
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
            batch = _on_device(collate(tokenizer, chunk), peft_model)
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

    reg: dict[str, float] = {}
    if task == "regression":
        reg = evaluate_regression(peft_model, tokenizer, eval_rows, config.eval_batch_size)
        accuracy, eval_loss = float("nan"), reg["mse"]
    else:
        accuracy, eval_loss = evaluate(peft_model, tokenizer, eval_rows, config.eval_batch_size)
    extra = run_extra(peft_config, config, len(train_rows), len(eval_rows))
    extra["task"] = task
    if initial_reg is not None:
        extra["initial_pearson"], extra["initial_spearman"] = initial_reg["pearson"], initial_reg["spearman"]
    extra["adapter_param_norm"] = adapter_param_norm(peft_model)  # L2 norm of the trained adapter tensors
    summary = getattr(peft_model.base_model, "training_summary", None)
    if summary is not None:  # each method reports its own extras (RLoRA: the PAC-Bayes terms)
        extra.update(summary(peft_model.active_adapter))
    return make_result(
        peft_model, config, method=method, params=params_count, accuracy=accuracy, eval_loss=eval_loss,
        optimizer=optimizer, train_time_s=train_time, step_times=timer, steps=step, epochs=step / steps_per_epoch,
        final_train_loss=last_loss, head_lr=config.head_lr if config.head_lr is not None else config.lr,
        extra=extra, loss_curve=curve, output_dir=output_dir, initial_accuracy=initial_acc,
        task=task, pearson=reg.get("pearson"), spearman=reg.get("spearman"),
    )


__all__ = ["evaluate", "evaluate_regression", "fit", "head_and_adapter_groups", "linear_schedule", "predict_scores",
           "prepare_head", "train_classifier"]
