"""What a run measures besides accuracy: memory (``/proc``), parameter counts, optimizer state, step times,
and the correlations of a regression run (Pearson, Spearman)."""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch


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


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes held by tensors in the optimizer's state (Adam: ``exp_avg``, ``exp_avg_sq``, ``step``); 0 without one."""
    if optimizer is None:
        return 0
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def adapter_param_norm(model: torch.nn.Module) -> float:
    """L2 norm of the trainable adapter tensors (PEFT's ``modules_to_save`` copies, the head, excluded)."""
    sq = sum(float(p.float().pow(2).sum()) for n, p in model.named_parameters()
             if p.requires_grad and "modules_to_save" not in n)
    return math.sqrt(sq)


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length sequences; NaN when either is constant (undefined)."""
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"pearson: needs two sequences of the same length >= 2, got {a.numel()} and {b.numel()}")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def average_ranks(values) -> list[float]:
    """1-based ranks of ``values``; ties get the mean of their ranks (as ``scipy.stats.rankdata``)."""
    vals = [float(v) for v in values]
    order = sorted(range(len(vals)), key=vals.__getitem__)
    ranks = [0.0] * len(vals)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and vals[order[j + 1]] == vals[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks); NaN when either is constant."""
    return pearson(average_ranks(x), average_ranks(y))


class StepTimes:
    """Wall time of each optimizer step: ``start()`` before the forward pass, ``stop()`` after the update."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.times.append(time.perf_counter() - self._t0)

    def median(self, default: float = float("nan")) -> float:
        return statistics.median(self.times) if self.times else default

    def as_callback(self):
        """A ``transformers.TrainerCallback`` recording into this object (step begin to step end)."""
        from transformers import TrainerCallback

        times = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                times.start()

            def on_step_end(self, args, state, control, **kwargs):
                times.stop()

        return StepTimer()


__all__ = [
    "StepTimes",
    "adapter_param_norm",
    "average_ranks",
    "count_parameters",
    "optimizer_state_bytes",
    "pearson",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "spearman",
]
