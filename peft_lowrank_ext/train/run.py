"""One training run's settings (:class:`TrainingConfig`) and its record (:class:`TrainResult`).

Both trainers (the plain classification loop, :mod:`peft_lowrank_ext.train.loop`, and TRL's
``SFTTrainer``, :mod:`peft_lowrank_ext.train.sft`) finish through :func:`make_result`: it saves the
adapter (to ``output_dir`` or a temporary folder), measures its size on disk and the peak memory, and
assembles the record with the run's extras and timings.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft_lowrank_ext.train.measure import StepTimes, optimizer_state_bytes, peak_rss_bytes

ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrainingConfig:
    """Hyper-parameters of a training run (:func:`~peft_lowrank_ext.train.loop.train_classifier`,
    :func:`~peft_lowrank_ext.train.sft.train_causal_lm`)."""

    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    head_lr: float | None = None  # lr of the classification head (PEFT's modules_to_save); None: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    max_length: int = 64
    seed: int = 0
    progress: bool = True
    log_every: int = 10
    device: str | None = None  # e.g. "cuda": move the model there before training; None: leave it where it is

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, what: str) -> ValueError:
            return ValueError(f"{name} (--{name.replace('_', '-')}): must be {what}, got {value!r}")

        for name in ("batch_size", "eval_batch_size", "max_length", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise bad(name, v, "a positive integer")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", self.max_steps, "a positive integer or None")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise bad("epochs", self.epochs, "a positive number")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is None and name == "head_lr":
                continue
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise bad(name, v, "a positive number")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise bad("warmup_ratio", self.warmup_ratio, "in [0, 1)")
        if self.weight_decay < 0:
            raise bad("weight_decay", self.weight_decay, ">= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise bad("max_grad_norm", self.max_grad_norm, "> 0 or None")
        if self.device is not None:
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise bad("device", self.device, "a torch device such as 'cpu', 'cuda' or 'cuda:1', or None") from None

    def total_steps(self, num_train_rows: int) -> int:
        """Optimizer steps of the run: ``max_steps``, or ``epochs`` over ``num_train_rows``."""
        return self.max_steps or max(1, math.ceil(self.epochs * math.ceil(num_train_rows / self.batch_size)))


@dataclass
class TrainResult:
    """What one training run measured. Times are seconds, sizes bytes.

    ``task`` is ``"classification"`` (``accuracy``), ``"regression"`` (``pearson``/``spearman`` on the
    evaluation split, ``eval_loss`` = mean squared error, ``accuracy`` NaN) or ``"causal-lm"``.
    """

    method: str
    accuracy: float
    eval_loss: float
    trainable_params: int
    total_params: int
    adapter_bytes: int
    optimizer_state_bytes: int
    train_time_s: float
    time_per_step_s: float
    median_step_s: float
    steps: int
    epochs: float
    lr: float
    head_lr: float
    final_train_loss: float
    initial_accuracy: float | None = None
    peak_rss_bytes: int | None = None
    adapter_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, training loss)
    task: str = "classification"
    pearson: float | None = None  # regression only
    spearman: float | None = None  # regression only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_adapter(peft_model, output_dir: str | os.PathLike | None) -> tuple[int, str | None]:
    """Save the adapter to ``output_dir`` (or a temporary folder that is removed);
    ``(bytes of adapter_model.safetensors, the folder or None)``."""
    if output_dir is not None:
        save_dir = Path(output_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(save_dir)
        return (save_dir / ADAPTER_FILE).stat().st_size, str(save_dir)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return (Path(tmp) / ADAPTER_FILE).stat().st_size, None


def run_extra(peft_config, config: TrainingConfig, train_rows: int, eval_rows: int) -> dict[str, Any]:
    """The settings every result records in ``extra``: target modules, data sizes, batch, length, seed."""
    targets = peft_config.target_modules
    return {"target_modules": sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
            "train_rows": train_rows, "eval_rows": eval_rows, "batch_size": config.batch_size,
            "max_length": config.max_length, "seed": config.seed}


def make_result(
    peft_model,
    config: TrainingConfig,
    *,
    method: str,
    params: tuple[int, int],
    accuracy: float,
    eval_loss: float,
    optimizer,
    train_time_s: float,
    step_times: StepTimes,
    steps: int,
    epochs: float,
    final_train_loss: float,
    head_lr: float,
    extra: dict[str, Any],
    loss_curve: list[tuple[int, float]],
    output_dir: str | os.PathLike | None = None,
    initial_accuracy: float | None = None,
    task: str | None = None,
    pearson: float | None = None,
    spearman: float | None = None,
) -> TrainResult:
    """Save the adapter and assemble the :class:`TrainResult` of a finished run (``params``:
    ``(trainable, total)`` counted before training). The wrapped model rides along as
    ``result.peft_model`` (not a field: kept out of ``to_dict()``), for push_to_hub and rank reports."""
    opt_bytes = optimizer_state_bytes(optimizer)
    adapter_bytes, adapter_dir = save_adapter(peft_model, output_dir)
    trainable, total = params
    result = TrainResult(
        method=method,
        accuracy=accuracy,
        eval_loss=eval_loss,
        trainable_params=trainable,
        total_params=total,
        adapter_bytes=adapter_bytes,
        optimizer_state_bytes=opt_bytes,
        train_time_s=train_time_s,
        time_per_step_s=train_time_s / steps,
        median_step_s=step_times.median(default=train_time_s / steps),
        steps=steps,
        epochs=epochs,
        lr=config.lr,
        head_lr=head_lr,
        final_train_loss=final_train_loss,
        initial_accuracy=initial_accuracy,
        peak_rss_bytes=peak_rss_bytes(),
        adapter_dir=adapter_dir,
        extra=extra,
        loss_curve=loss_curve,
        task=task or extra.get("task", "classification"),
        pearson=pearson,
        spearman=spearman,
    )
    result.peft_model = peft_model
    return result


__all__ = ["ADAPTER_FILE", "TrainResult", "TrainingConfig", "make_result", "run_extra", "save_adapter"]
