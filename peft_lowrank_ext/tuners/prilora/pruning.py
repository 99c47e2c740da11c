"""PRILoRA's pruning policy [reconstructed]: importance, schedule and the per-row mask.

* Importance of entry ``A_ij``: ``S_ij = |A_ij| · sqrt(n_j)`` where ``n_j`` is the EMA of the squared
  layer input of feature ``j`` (a Wanda-style score: a weight matters as much as the signal it
  multiplies).
* Steps [ours]: ``prune_start``/``prune_end``/``prune_every`` are absolute steps when given, else
  ``round(fraction · total_steps)`` of the run (``resolve_schedule``; ``prune_every`` at least 1).
* Schedule: sparsity ``s(t)`` after ``t`` completed optimizer steps is 0 before ``prune_start``,
  ``final_sparsity`` from ``prune_end`` on, and in between ``s_f·(1 − (1 − p)³)`` (cubic) or
  ``s_f·p`` (linear) with ``p = (t − prune_start)/(prune_end − prune_start)``.
* Events: at ``t ≥ prune_start`` with ``(t − prune_start) % prune_every == 0``, and at
  ``t = max(prune_end, 1)`` (so the final sparsity is always reached). Each row of ``A`` then has its
  ``k = floor(s(t)·d_in)`` lowest-importance entries masked (ties: lower column index first);
  ``k < d_in`` always, so every row keeps an entry. Without ``regrow`` masked entries stay masked
  (they rank below every live entry, and the new mask is intersected with the old one).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

_EPS = 1e-9  # guards floor(s·d_in) against float noise such as 0.3·10 = 2.9999999999999996


def ramp_fraction(step: int, start: int, end: int) -> float:
    if step < start:
        return 0.0
    if step >= end:
        return 1.0
    return (step - start) / (end - start)


class Schedule(NamedTuple):
    """The pruning schedule in optimizer steps."""

    start: int
    end: int
    every: int


_FRACTION_DEFAULTS = {"prune_start": 0.0, "prune_end": 0.8, "prune_every": 0.02}  # = config.DEFAULT_PRUNE_*


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def missing_total_message(config) -> str:
    given = ", ".join(f"{n}_fraction={getattr(config, n + '_fraction')!r}" for n in _FRACTION_DEFAULTS
                      if getattr(config, n) is None)
    return ("PRILoRA: the pruning schedule is relative to the run (" + given + ", None = default) but the run's "
            "total optimizer steps are unknown, so the scheduled sparsity cannot be computed. Pass "
            "callbacks=[PriLoraScheduleCallback()] to Trainer/SFTTrainer, or set PriLoraConfig(total_steps=N), or "
            "call set_prilora_total_steps(model, N) before training (both from peft_lowrank_ext.tuners.prilora), "
            "or give absolute prune_start, prune_end and prune_every.")


def resolve_schedule(config, total_steps: int | None, owner: str = "PriLoraConfig") -> Schedule:
    """Start, end and spacing in steps: absolute fields win, fractions are taken of ``total_steps``.

    Raises ``ValueError`` when a fraction is needed and ``total_steps`` is unknown, when an absolute field and its
    fraction are both given and disagree, when ``total_steps`` contradicts ``config.total_steps``, or when the
    final sparsity would only be reached after the run's last step.
    """
    from .._base.checks import _fail

    if total_steps is not None and config.total_steps is not None and total_steps != config.total_steps:
        _fail(owner, "total_steps", config.total_steps,
              f"None or {total_steps} (the run has {total_steps} optimizer steps)")
    total = config.total_steps if total_steps is None else total_steps
    values = {}
    for name, default in _FRACTION_DEFAULTS.items():
        fraction = getattr(config, name + "_fraction")
        fraction = default if fraction is None else fraction
        absolute = getattr(config, name)
        if total is None:
            if absolute is None and fraction != 0:
                raise ValueError(missing_total_message(config))
            values[name] = 0 if absolute is None else absolute
            continue
        derived = _half_up(fraction * total)
        if name == "prune_every":
            derived = max(1, derived)
        if absolute is not None and getattr(config, name + "_fraction") is not None and absolute != derived:
            _fail(owner, name, absolute, f"None or {derived} (= {name}_fraction {fraction!r} of total_steps {total}); "
                                         "give the step or the fraction of the run, not both")
        values[name] = derived if absolute is None else absolute
    start, end, every = values["prune_start"], values["prune_end"], values["prune_every"]
    if end < start:
        _fail(owner, "prune_end", end, f"an integer in [{start}, inf] (prune_end >= prune_start, the start being "
                                       f"{'prune_start' if config.prune_start is not None else 'prune_start_fraction'})")
    if total is not None and end > total:
        _fail(owner, "prune_end", end, f"an integer in [{start}, {total}]: the run has {total} optimizer steps, so "
                                       "final_sparsity would never be reached (use prune_end_fraction instead)")
    return Schedule(start, end, every)


def scheduled_sparsity(config, step: int, total_steps: int | None = None) -> float:
    """The fraction of each row of ``A`` to mask after ``step`` completed optimizer steps."""
    return sparsity_at(config, step, resolve_schedule(config, total_steps))


def sparsity_at(config, step: int, schedule: Schedule) -> float:
    """:func:`scheduled_sparsity` on an already resolved schedule."""
    p = ramp_fraction(step, schedule.start, schedule.end)
    if config.sparsity_schedule == "linear":
        return config.final_sparsity * p
    return config.final_sparsity * (1.0 - (1.0 - p) ** 3)


def is_prune_step(schedule: Schedule, step: int) -> bool:
    """Whether a pruning event follows optimizer step ``step`` (every ``every`` from ``start``, and at ``end``)."""
    start, end, every = schedule
    return step >= start and ((step - start) % every == 0 or step == max(end, 1))


def pruned_per_row(sparsity: float, d_in: int) -> int:
    return min(d_in - 1, int(math.floor(sparsity * d_in + _EPS)))


def importance(lora_a: torch.Tensor, input_sq_ema: torch.Tensor) -> torch.Tensor:
    """``S_ij = |A_ij| · sqrt(n_j)`` in fp32."""
    return lora_a.detach().float().abs() * input_sq_ema.detach().float().clamp_min(0).sqrt()


def prune_mask(lora_a: torch.Tensor, input_sq_ema: torch.Tensor, old_mask: torch.Tensor, sparsity: float,
               regrow: bool) -> torch.Tensor:
    """The new 0/1 mask (A's shape, ``old_mask``'s dtype) that masks ``floor(sparsity·d_in)`` entries per row."""
    rows, d_in = lora_a.shape
    k = pruned_per_row(sparsity, d_in)
    score = importance(lora_a, input_sq_ema)
    if not regrow:
        score = torch.where(old_mask > 0, score, torch.full_like(score, -1.0))  # masked entries go first
    mask = torch.ones(rows, d_in, dtype=old_mask.dtype, device=old_mask.device)
    if k > 0:
        order = torch.argsort(score, dim=1, stable=True)[:, :k]
        mask.scatter_(1, order, 0.0)
    if not regrow:
        mask = mask * old_mask
    return mask
