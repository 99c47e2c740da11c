"""Zero-cost proxies that score HeteroLoRA's candidates (every candidate switched on while scoring).

For a candidate with ``ΔW = s · B A``:

* ``constant``: 0 for all — the allocation is the seeded random tie-break;
* ``grad_norm``: ``‖∇A‖ + ‖∇B‖`` (Frobenius norms) of the training loss;
* ``snip``: ``Σ|A ⊙ ∇A| + Σ|B ⊙ ∇B|`` (the authors compute it as the gradient of all-ones masks);
* ``synflow``: every floating-point parameter of the model made positive (``|θ|``), the input
  embedding replaced by all ones (no data needed), ``R = Σ`` model outputs, score
  ``Σ|θ ⊙ ∂R/∂θ|`` over the candidate's A and B; signs are restored afterwards (this costs one
  byte per model parameter while it runs);
* ``alpha_test``: the candidate's output is multiplied by ``a/10``; the score is the smallest
  ``a ∈ {0..10}`` (binary search, assuming the loss is monotone in ``a``) whose loss stays within
  ``loss · (1 + alpha_test_tolerance)`` of the unscaled model, divided by 10 — a module that can be
  scaled to 0 without hurting scores 0.

Scores are summed over the scored batches and averaged at allocation time; larger is better.

**At B = 0 (the usual LoRA initialisation) SNIP, SynFlow and the alpha test are exactly zero for
every candidate**: ``∇A = s Bᵀ(…) = 0`` and ``B = 0`` make both SNIP terms vanish (likewise for
SynFlow), and a module whose output is zero cannot change the loss when scaled. They only carry
information once the modules have trained. So every scoring pass also records ``grad_norm``
(which at B = 0 is ``‖∇B‖``, the gradient of B's contribution, and is informative from the
start) whenever loss gradients are at hand. An allocation whose proxy scores are all exactly zero
is, by default (``zero_score_fallback="tie_break"``), the seeded random tie-break — what the
authors' code does — and the history records ``all_zero``; with ``zero_score_fallback="grad_norm"``
it uses that gradient norm instead, says so in the history (``fallback``) and warns. In
dynamic mode modules that have never been switched on keep B = 0 and therefore score 0 under
these three proxies: they are only picked by the tie-break when fewer than ``k`` modules score
above zero — a property of the proxies, reported rather than hidden.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ...runtime.distributed import replica_reduce
from .layer import HeteroLoraLayer

BUSY_ATTR = "_heterolora_busy"
Batch = tuple[tuple, dict]


@dataclass
class Candidate:
    """One switchable module of one adapter; ``name`` is relative to the adapted transformers model."""

    name: str
    layer: HeteroLoraLayer
    adapter: str

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def a(self) -> torch.Tensor:
        return self.layer._store("A")[self.adapter]

    @property
    def b(self) -> torch.Tensor:
        return self.layer._store("B")[self.adapter]

    @property
    def on(self) -> bool:
        return self.layer.is_on(self.adapter)


# ----- context ----------------------------------------------------------------------------------
@contextlib.contextmanager
def all_switched_on(cands: list[Candidate]) -> Iterator[None]:
    """Every candidate on for the duration (the paper scores with all modules switched on)."""
    saved = [c.layer._store("module_on")[c.adapter].clone() for c in cands]
    try:
        for c in cands:
            c.layer.set_on(c.adapter, True)
        yield
    finally:
        with torch.no_grad():
            for c, value in zip(cands, saved):
                c.layer._store("module_on")[c.adapter].copy_(value)


@contextlib.contextmanager
def scoring_pass(root: nn.Module, training: Optional[bool] = None) -> Iterator[None]:
    """Mark the root busy (its batch capture ignores our passes); optionally switch train/eval mode."""
    busy = root.__dict__.get(BUSY_ATTR, False)
    modes = [(m, m.training) for m in root.modules()] if training is not None else []
    object.__setattr__(root, BUSY_ATTR, True)
    if training is not None:
        root.train(training)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        object.__setattr__(root, BUSY_ATTR, busy)


@contextlib.contextmanager
def _requiring_grad(params: list[torch.Tensor]) -> Iterator[None]:
    """Scoring a frozen adapter (e.g. loaded for inference) still needs gradients w.r.t. A and B."""
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


def _params(cands: list[Candidate]) -> list[torch.Tensor]:
    return [p for c in cands for p in (c.a, c.b)]


def _loss(root: nn.Module, batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    out = root(*args, **kwargs)
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None and isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]) and out[0].dim() == 0:
        loss = out[0]
    if loss is None:
        raise ValueError("HeteroLoRA scoring: the model returned no loss; the batches must contain labels")
    return loss


def _logits(out) -> torch.Tensor:
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    return logits


def _pairs(grads, cands) -> list[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
    grads = list(grads)
    return [(grads[2 * i], grads[2 * i + 1]) for i in range(len(cands))]


# ----- scores from gradients --------------------------------------------------------------------
def _zero_if_none(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if g is None else g


def grad_norm_scores(cands: list[Candidate], grads) -> torch.Tensor:
    out = [_zero_if_none(ga, c.a).float().norm() + _zero_if_none(gb, c.b).float().norm()
           for c, (ga, gb) in zip(cands, grads)]
    return torch.stack([o.to(out[0].device) for o in out])


def snip_scores(cands: list[Candidate], grads) -> torch.Tensor:
    out = [(c.a.detach().float() * _zero_if_none(ga, c.a).float()).abs().sum()
           + (c.b.detach().float() * _zero_if_none(gb, c.b).float()).abs().sum()
           for c, (ga, gb) in zip(cands, grads)]
    return torch.stack([o.to(out[0].device) for o in out])


def loss_grads(root: nn.Module, batch: Batch, cands: list[Candidate]):
    """Gradients of the loss on ``batch`` w.r.t. every candidate's A and B (``.grad`` is left alone)."""
    params = _params(cands)
    with all_switched_on(cands), scoring_pass(root), _requiring_grad(params), torch.enable_grad():
        loss = _loss(root, batch)
        try:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        except RuntimeError as err:  # reentrant gradient checkpointing refuses autograd.grad
            if "heckpoint" not in str(err):
                raise
            grads = _grads_by_backward(root, batch, params)
    # Data parallel: the replica's own batch only; the mean over replicas is the gradient of the
    # concatenated batches (mean loss), so re-scoring matches one process and every replica agrees.
    return _pairs(replica_reduce(list(grads)), cands)


def _grads_by_backward(root: nn.Module, batch: Batch, params: list[torch.Tensor]):
    """``.backward()`` with every ``.grad`` stashed and restored (used only where autograd.grad is refused)."""
    trainable = [p for p in root.parameters() if p.requires_grad]
    stash = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        _loss(root, batch).backward()
        return [None if p.grad is None else p.grad.detach().clone() for p in params]
    finally:
        for p, g in zip(trainable, stash):
            p.grad = g


# ----- SynFlow ----------------------------------------------------------------------------------
def _ones_embedding_hook(root: nn.Module):
    get = getattr(root, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        embedding = get()
    except (NotImplementedError, AttributeError):
        return None
    if embedding is None:
        return None
    return embedding.register_forward_hook(lambda module, args, output: torch.ones_like(output))


def _ones_inputs(batch: Batch) -> Batch:
    args, kwargs = batch
    ones = lambda v: torch.ones_like(v) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
    return tuple(ones(a) for a in args), {k: ones(v) for k, v in kwargs.items()}


def synflow_scores(root: nn.Module, batch: Batch, cands: list[Candidate]) -> torch.Tensor:
    params = _params(cands)
    weights = [p for p in root.parameters() if p.is_floating_point()]
    args, kwargs = batch
    batch = (args, {k: v for k, v in kwargs.items() if k != "labels"})
    negative = []
    with torch.no_grad():
        for p in weights:
            negative.append(torch.signbit(p))
            p.abs_()
    handle = _ones_embedding_hook(root)
    if handle is None:
        batch = _ones_inputs(batch)
    try:
        with all_switched_on(cands), scoring_pass(root, training=False), _requiring_grad(params), \
                torch.enable_grad():
            out = root(*batch[0], **batch[1])
            total = _logits(out).float().sum()
            # R sums over the batch, so the sum over replicas is R of the concatenated batches.
            grads = _pairs(replica_reduce(list(torch.autograd.grad(total, params, allow_unused=True)), "sum"), cands)
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            for p, neg in zip(weights, negative):
                p.copy_(torch.where(neg, -p, p))
    scores = snip_scores(cands, grads)  # Σ|θ ⊙ ∇θ| with θ = |θ| (sign-independent)
    return torch.nan_to_num(scores, nan=0.0, posinf=torch.finfo(scores.dtype).max)


# ----- alpha test -------------------------------------------------------------------------------
def _replica_loss(root: nn.Module, batch: Batch) -> float:
    """The loss averaged over data-parallel replicas, so all of them run the same binary search."""
    return float(replica_reduce([_loss(root, batch).detach()])[0])


@torch.no_grad()
def alpha_test_scores(root: nn.Module, batch: Batch, cands: list[Candidate], tolerance: float) -> torch.Tensor:
    scores = []
    with all_switched_on(cands), scoring_pass(root, training=False):
        base = _replica_loss(root, batch)
        limit = base + tolerance * abs(base)
        for c in cands:
            scale = c.layer.__dict__.setdefault("_hetero_output_scale", {})
            lo, hi = 0, 10
            try:
                while lo < hi:
                    mid = (lo + hi) // 2
                    scale[c.adapter] = mid / 10
                    if _replica_loss(root, batch) > limit:
                        lo = mid + 1
                    else:
                        hi = mid
            finally:
                scale.pop(c.adapter, None)
            scores.append(hi / 10)
    return torch.tensor(scores, device=cands[0].a.device)


# ----- one batch, any proxy ---------------------------------------------------------------------
def score_batch(root: nn.Module, batch: Batch, cands: list[Candidate], proxy: str, tolerance: float,
                grads=None, zero_score_fallback: str = "tie_break") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(proxy score, gradient-norm fallback or None)`` per candidate for one batch.

    ``grads`` are loss gradients already at hand (the training step's, during the first scoring
    window); otherwise a gradient-based proxy runs its own forward/backward pass. SynFlow and the
    alpha test pay an extra pass for the gradient-norm fallback of an all-zero score only with
    ``zero_score_fallback="grad_norm"``.
    """
    device = cands[0].a.device
    if proxy == "constant":
        zeros = torch.zeros(len(cands), device=device)
        return zeros, zeros
    if grads is None and proxy in ("grad_norm", "snip"):
        grads = loss_grads(root, batch, cands)
    fallback = grad_norm_scores(cands, grads) if grads is not None else None
    if proxy == "grad_norm":
        return fallback, fallback
    if proxy == "snip":
        return snip_scores(cands, grads), fallback
    if proxy == "synflow":
        main = synflow_scores(root, batch, cands)
    elif proxy == "alpha_test":
        main = alpha_test_scores(root, batch, cands, tolerance)
    else:
        raise ValueError(f"proxy={proxy!r} is not allowed")
    if fallback is None and zero_score_fallback == "grad_norm" and not bool(main.any()):
        # uninformative (B = 0) and the gradient-norm fallback asked for: pay for it
        fallback = grad_norm_scores(cands, loss_grads(root, batch, cands))
    return main, fallback
