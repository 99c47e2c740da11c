"""PRILoRA's pruning policy [reconstructed]: importance, schedule and the per-row mask.

* Importance of entry ``A_ij``: ``S_ij = |A_ij| · sqrt(n_j)`` where ``n_j`` is the EMA of the squared
  layer input of feature ``j`` (a Wanda-style score: a weight matters as much as the signal it
  multiplies).
* Schedule: sparsity ``s(t)`` after ``t`` completed optimizer steps is 0 before ``prune_start``,
  ``final_sparsity`` from ``prune_end`` on, and in between ``s_f·(1 − (1 − p)³)`` (cubic) or
  ``s_f·p`` (linear) with ``p = (t − prune_start)/(prune_end − prune_start)``.
* Events: at ``t ≥ prune_start`` with ``(t − prune_start) % prune_every == 0``, and at ``t = prune_end``
  (so the final sparsity is always reached). Each row of ``A`` then has its
  ``k = floor(s(t)·d_in)`` lowest-importance entries masked (ties: lower column index first);
  ``k < d_in`` always, so every row keeps an entry. Without ``regrow`` masked entries stay masked
  (they rank below every live entry, and the new mask is intersected with the old one).
"""

from __future__ import annotations

import math

import torch

_EPS = 1e-9  # guards floor(s·d_in) against float noise such as 0.3·10 = 2.9999999999999996


def ramp_fraction(step: int, start: int, end: int) -> float:
    if step < start:
        return 0.0
    if step >= end:
        return 1.0
    return (step - start) / (end - start)


def scheduled_sparsity(config, step: int) -> float:
    """The fraction of each row of ``A`` to mask after ``step`` completed optimizer steps."""
    p = ramp_fraction(step, config.prune_start, config.prune_end)
    if config.sparsity_schedule == "linear":
        return config.final_sparsity * p
    return config.final_sparsity * (1.0 - (1.0 - p) ** 3)


def is_prune_step(config, step: int) -> bool:
    if step < config.prune_start:
        return False
    return (step - config.prune_start) % config.prune_every == 0 or step == config.prune_end


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
