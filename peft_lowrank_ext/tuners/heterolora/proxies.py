"""Zero-cost proxies that score HeteroLoRA's candidates (every candidate switched on while scoring).

For a candidate with ``ΔW = s · B A``:

* ``constant``: 0 for all — the allocation is the seeded random tie-break;
* ``grad_norm``: ``‖∇A‖ + ‖∇B‖`` (Frobenius norms) of the training loss;
* ``snip``: ``Σ|A ⊙ ∇A| + Σ|B ⊙ ∇B|`` (the authors compute it as the gradient of all-ones masks);
* ``weight_grad_norm`` (ours): ``‖Σ_tokens g xᵀ‖`` with ``x`` the candidate's input and ``g`` the
  loss gradient at its output — the gradient of a full-rank update at that position. It does not
  depend on the candidate's own A and B, so switched-on and switched-off candidates are scored on
  the same footing (``grad_norm`` is not: see "Dynamic re-allocation" below);
* ``synflow`` (the authors'): every floating-point parameter made positive (``|θ|``), the input
  embedding replaced by all ones, the *loss with the batch's labels* back-propagated (the model's
  train/eval mode is left as it is, as in the authors' callback); score ``Σ|θ ⊙ ∇θ|`` over A and B;
  signs are restored afterwards (one byte per model parameter while it runs);
* ``synflow_logits`` (ours, the earlier ``synflow``): the same with ``R = Σ`` logits, no labels,
  in eval mode;
* ``alpha_test`` (the authors'): each candidate in turn is scaled by ``a/10`` — for a LoRA module
  the *whole layer output* ``W0 x + b + ΔW x``, for a shortcut ``ΔS h`` — and the score is the
  smallest ``a ∈ {0..10}`` (binary search) whose *task metric* on ``proxy_batches`` batches of a
  1:1 training/validation mix stays within tolerance: accuracy ``≥ m − m·tol``, perplexity
  ``≤ m + tol/m`` (the authors' thresholds), divided by 10. Run in eval mode (the authors' callback
  leaves the model in training mode, so dropout is on there);
* ``alpha_test_delta`` (ours, the earlier ``alpha_test``): only ``ΔW x`` is scaled and the criterion
  is the training loss: ``loss ≤ base · (1 + tol)``, per scored training batch.

Scores are summed over the scored batches and averaged at allocation time; larger is better.

**At B = 0 (the usual LoRA initialisation) SNIP, both SynFlows and ``alpha_test_delta`` are exactly
zero for every candidate**: ``∇A = s Bᵀ(…) = 0`` and ``B = 0`` make both SNIP terms vanish (likewise
for SynFlow), and a module whose output is zero cannot change the loss when scaled. (The authors'
``alpha_test`` scales the base layer too, so it is informative for LoRA candidates at B = 0; shortcut
candidates then score 0.) They only carry
information once the modules have trained. So every scoring pass also records ``grad_norm``
(which at B = 0 is ``‖∇B‖``, the gradient of B's contribution, and is informative from the
start) whenever loss gradients are at hand. An allocation whose proxy scores are all exactly zero
is, by default (``zero_score_fallback="tie_break"``), the seeded random tie-break — what the
authors' code does — and the history records ``all_zero``; with ``zero_score_fallback="grad_norm"``
it uses that gradient norm instead, says so in the history (``fallback``) and warns. 

**Dynamic re-allocation and the incumbents.** Every proxy except ``constant`` and
``weight_grad_norm`` scores a candidate through its own factors, so a candidate that has trained
is scored differently from one that has not. For ``grad_norm``: ``∇A = s Bᵀ ∇W`` is 0 for a
never-switched-on candidate (B = 0) but not for an incumbent, and ``∇B = s ∇W Aᵀ`` grows once A has
aligned with the gradient; SNIP/SynFlow give never-switched-on candidates exactly 0. The authors'
code scores the same way, so this bias toward the incumbents is the method, not a bug of this
package; ``proxy="weight_grad_norm"`` scores all candidates on the same footing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

from ...runtime.distributed import fsdp1_whole, fsdp_kind, is_sharded, replica_reduce, world_size
from .layer import DELTA_SCALE_ATTR, LAYER_SCALE_ATTR, WEIGHT_GRAD_ATTR, HeteroLoraLayer

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


# ----- FSDP ------------------------------------------------------------------------------------
# Under FSDP A/B are shards outside forward (FSDP2: DTensors; FSDP1: flat slices) and autograd.grad cannot
# reach them: scoring runs before the sharded model's forward (``allocation.attach_sharded_entry``), its
# passes go through that model, gradients come from loss.backward() (FSDP averages them over replicas, as
# replica_reduce does) and scores read whole tensors (FSDP2: full_tensor(); FSDP1: copies taken inside
# summon_full_params right after the backward).
ENTRY_ATTR = "_heterolora_fsdp_entry"
_FSDP1_WHOLE: dict[int, torch.Tensor] = {}  # id(parameter) -> whole value, for the scoring pass running now


def _sharding(root: nn.Module) -> Optional[str]:
    first = next((p for m in root.modules() if isinstance(m, HeteroLoraLayer) for p in m._store("A").values()), None)
    return None if first is None else fsdp_kind(first)


def sharded_entry(root: nn.Module) -> Optional[nn.Module]:
    """The FSDP model to run scoring passes through when A/B are FSDP shards; None otherwise."""
    sharding = _sharding(root)
    if sharding is None:
        return None
    ref = root.__dict__.get(ENTRY_ATTR)
    entry = ref() if ref is not None else None
    if entry is None:
        raise RuntimeError(
            f"HeteroLoRA scoring under {sharding} needs the sharded model: its passes must go through it, before "
            "its forward. Attach HeteroLoraData to the FSDP model you train (HeteroLoraData().attach(fsdp_model), "
            "or pass it to Trainer as a callback), with timing='authors'.")
    return entry


def _whole(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return t
    if is_sharded(t):
        return t.full_tensor()
    return _FSDP1_WHOLE.get(id(t), t)


def _backward_grads(root: nn.Module, loss: torch.Tensor, params: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Whole, replica-averaged gradients of ``loss`` under FSDP (``.grad`` stashed and restored)."""
    if _sharding(root) != "FSDP1 (FullyShardedDataParallel)":
        return [_whole(g) for g in _grads_by_backward(root, loss, params)]
    with _stashed_grads(root):
        loss.backward()
        _FSDP1_WHOLE.clear()
        with fsdp1_whole(sharded_entry(root), params, with_grads=True):
            grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
            _FSDP1_WHOLE.update({id(p): p.detach().clone() for p in params})
        return grads


def _runner(root: nn.Module) -> nn.Module:
    entry = sharded_entry(root)
    return root if entry is None else entry


def _loss(root: nn.Module, batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    out = _runner(root)(*args, **kwargs)
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
    out = [_zero_if_none(_whole(ga), _whole(c.a)).float().norm() + _zero_if_none(_whole(gb), _whole(c.b)).float().norm()
           for c, (ga, gb) in zip(cands, grads)]
    return torch.stack([o.to(out[0].device) for o in out])


def snip_scores(cands: list[Candidate], grads) -> torch.Tensor:
    out = []
    for c, (ga, gb) in zip(cands, grads):
        a, b = _whole(c.a).detach().float(), _whole(c.b).detach().float()
        out.append((a * _zero_if_none(_whole(ga), a).float()).abs().sum()
                   + (b * _zero_if_none(_whole(gb), b).float()).abs().sum())
    return torch.stack([o.to(out[0].device) for o in out])


def loss_grads(root: nn.Module, batch: Batch, cands: list[Candidate]):
    """Gradients of the loss on ``batch`` w.r.t. every candidate's A and B (``.grad`` is left alone)."""
    params = _params(cands)
    if sharded_entry(root) is not None:
        with all_switched_on(cands), scoring_pass(root), _requiring_grad(params), torch.enable_grad():
            grads = _backward_grads(root, _loss(root, batch), params)  # replica-averaged by FSDP
        return _pairs(grads, cands)
    with all_switched_on(cands), scoring_pass(root), _requiring_grad(params), torch.enable_grad():
        loss = _loss(root, batch)
        try:
            grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        except RuntimeError as err:  # reentrant gradient checkpointing refuses autograd.grad ...
            if "heckpoint" not in str(err):
                raise
            grads = None
        if grads is None or all(g is None for g in grads):  # ... or, outside its graph, returns only None
            grads = _grads_by_backward(root, loss, params)  # the same loss: no second forward, same dropout
    # Data parallel: the replica's own batch only; the mean over replicas is the gradient of the
    # concatenated batches (mean loss), so re-scoring matches one process and every replica agrees.
    return _pairs(replica_reduce(list(grads)), cands)


@contextlib.contextmanager
def _stashed_grads(root: nn.Module) -> Iterator[None]:
    """Every trainable parameter's ``.grad`` cleared inside the block and restored after it."""
    trainable = [p for p in root.parameters() if p.requires_grad]
    stash = [p.grad for p in trainable]
    for p in trainable:
        p.grad = None
    try:
        yield
    finally:
        for p, g in zip(trainable, stash):
            p.grad = g


def _grads_by_backward(root: nn.Module, loss: torch.Tensor, params: list[torch.Tensor]):
    """``loss.backward()`` with every ``.grad`` stashed and restored (where autograd.grad cannot see the
    adapter weights: reentrant gradient checkpointing, FSDP)."""
    with _stashed_grads(root):
        loss.backward()
        return [None if p.grad is None else p.grad.detach().clone() for p in params]


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


def synflow_scores(root: nn.Module, batch: Batch, cands: list[Candidate], with_labels: bool = True) -> torch.Tensor:
    """``with_labels``: the authors' SynFlow (the loss, labels kept, mode as is); else ``synflow_logits``."""
    params = _params(cands)
    weights = [p for p in root.parameters() if p.is_floating_point()]
    args, kwargs = batch
    if not with_labels:
        batch = (args, {k: v for k, v in kwargs.items() if k != "labels"})
    # Under DeepSpeed ZeRO-3 the pass may re-gather a weight from its shards: make the shards |θ| too.
    tensors = [t for p in weights for t in (p, getattr(p, "ds_tensor", None)) if t is not None and t.numel()]
    negative = []
    with torch.no_grad():
        for p in tensors:
            negative.append(torch.signbit(p))
            p.abs_()
    handle = _ones_embedding_hook(root)
    if handle is None:
        batch = _ones_inputs(batch)
    try:
        with all_switched_on(cands), scoring_pass(root, training=None if with_labels else False), \
                _requiring_grad(params), torch.enable_grad():
            sharded = sharded_entry(root) is not None
            if with_labels:  # the mean loss: the mean over replicas is that of the concatenated batches
                total = _loss(root, batch).float()
                grads = (_backward_grads(root, total, params) if sharded
                         else replica_reduce(list(torch.autograd.grad(total, params, allow_unused=True))))
            else:  # R sums over the batch, so the sum over replicas is R of the concatenated batches.
                total = _logits(_runner(root)(*batch[0], **batch[1])).float().sum()
                if sharded:  # FSDP averages over replicas: times the replica count is the sum
                    grads = [None if g is None else g * world_size() for g in _backward_grads(root, total, params)]
                else:
                    grads = replica_reduce(list(torch.autograd.grad(total, params, allow_unused=True)), "sum")
            grads = _pairs(grads, cands)
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            for p, neg in zip(tensors, negative):
                p.copy_(torch.where(neg, -p.abs(), p.abs()))  # idempotent, should a shard alias its weight
    scores = snip_scores(cands, grads)  # Σ|θ ⊙ ∇θ| with θ = |θ| (sign-independent)
    return torch.nan_to_num(scores, nan=0.0, posinf=torch.finfo(scores.dtype).max)


# ----- alpha test -------------------------------------------------------------------------------
def _replica_loss(root: nn.Module, batch: Batch) -> float:
    """The loss averaged over data-parallel replicas, so all of them run the same binary search."""
    return float(replica_reduce([_loss(root, batch).detach()])[0])


def _smallest_kept_scale(cands: list[Candidate], attr_of, exceeds) -> torch.Tensor:
    """Per candidate: the smallest scale a/10 (a = 0..10, binary search) at which ``exceeds()`` is false,
    with the candidate's scale set under ``attr_of(candidate)`` (one candidate scaled at a time)."""
    scores = []
    for c in cands:
        scale = c.layer.__dict__.setdefault(attr_of(c), {})
        lo, hi = 0, 10
        try:
            while lo < hi:
                mid = (lo + hi) // 2
                scale[c.adapter] = mid / 10
                if exceeds():
                    lo = mid + 1
                else:
                    hi = mid
        finally:
            scale.pop(c.adapter, None)
        scores.append(hi / 10)
    return torch.tensor(scores, device=cands[0].a.device)


@torch.no_grad()
def alpha_test_delta_scores(root: nn.Module, batch: Batch, cands: list[Candidate], tolerance: float) -> torch.Tensor:
    """Ours: scale ΔW x only; the training loss may rise by ``tolerance`` (relative)."""
    with all_switched_on(cands), scoring_pass(root, training=False):
        base = _replica_loss(root, batch)
        limit = base + tolerance * abs(base)
        return _smallest_kept_scale(cands, lambda c: DELTA_SCALE_ATTR, lambda: _replica_loss(root, batch) > limit)


def task_metric(root: nn.Module, batches: list[Batch], metric: str) -> float:
    """Accuracy (argmax of the logits against the labels, over every example) or perplexity (exp of the
    mean batch loss), as the authors' torchmetrics; counts are summed over data-parallel replicas."""
    if metric == "perplexity":
        losses = torch.stack([_loss(root, b).detach().float() for b in batches])
        return float(torch.exp(replica_reduce([losses.mean()])[0]))
    correct = total = None
    for args, kwargs in batches:
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError("HeteroLoRA alpha_test (accuracy): the batches must contain labels")
        out = root(*args, **kwargs)
        pred = _logits(out).argmax(-1)
        hits = (pred.reshape(-1) == labels.to(pred.device).reshape(-1)).sum().float()
        n = torch.tensor(float(labels.numel()), device=hits.device)
        correct = hits if correct is None else correct + hits
        total = n if total is None else total + n
    correct, total = replica_reduce([correct, total], "sum")
    return float(correct / total)


@torch.no_grad()
def alpha_test_scores(root: nn.Module, batches: list[Batch], cands: list[Candidate], tolerance: float,
                      metric: str) -> torch.Tensor:
    """The authors' alpha test: the smallest scale a/10 of the whole layer output (ΔS for a shortcut)
    that keeps the task metric on ``batches`` within the tolerance."""
    with all_switched_on(cands), scoring_pass(root, training=False):
        base = task_metric(root, batches, metric)
        if metric == "perplexity":  # the authors' threshold: larger impact required as perplexity falls
            limit = base + tolerance / base
            exceeds = lambda: task_metric(root, batches, metric) > limit  # noqa: E731
        else:
            limit = base - base * tolerance
            exceeds = lambda: task_metric(root, batches, metric) < limit  # noqa: E731
        return _smallest_kept_scale(cands, lambda c: LAYER_SCALE_ATTR if c.kind == "lora" else DELTA_SCALE_ATTR,
                                    exceeds)


# ----- weight gradient (ours) ---------------------------------------------------------------------
def weight_grad_scores(root: nn.Module, batch: Batch, cands: list[Candidate]):
    """``(‖Σ g xᵀ‖ per candidate, loss gradients of A/B)`` from one forward/backward pass."""
    if sharded_entry(root) is not None:
        raise RuntimeError(f"HeteroLoRA proxy='weight_grad_norm' under {_sharding(root)} is not supported: it "
                           "collects per-layer gradients outside FSDP's reduction. Use another proxy (grad_norm, "
                           "snip, synflow, alpha_test) under FSDP.")
    sinks = []
    for c in cands:
        sink = c.layer.__dict__.setdefault(WEIGHT_GRAD_ATTR, {})
        sink[c.adapter] = None
        sinks.append(sink)
    try:
        grads = loss_grads(root, batch, cands)
        mats = [sink[c.adapter] if sink[c.adapter] is not None else torch.zeros(()) for sink, c in zip(sinks, cands)]
    finally:
        for sink, c in zip(sinks, cands):
            sink.pop(c.adapter, None)
    mats = replica_reduce(mats)  # mean over replicas: the gradient of the concatenated batches' mean loss
    device = cands[0].a.device
    return torch.stack([m.float().norm().to(device) for m in mats]), grads


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
    if proxy == "weight_grad_norm":
        main, grads = weight_grad_scores(root, batch, cands)
        return main, grad_norm_scores(cands, grads)
    if grads is None and proxy in ("grad_norm", "snip"):
        grads = loss_grads(root, batch, cands)
    fallback = grad_norm_scores(cands, grads) if grads is not None else None
    if proxy == "grad_norm":
        return fallback, fallback
    if proxy == "snip":
        return snip_scores(cands, grads), fallback
    if proxy in ("synflow", "synflow_logits"):
        main = synflow_scores(root, batch, cands, with_labels=proxy == "synflow")
    elif proxy == "alpha_test_delta":
        main = alpha_test_delta_scores(root, batch, cands, tolerance)
    else:
        raise ValueError(f"proxy={proxy!r} is not allowed")
    if fallback is None and zero_score_fallback == "grad_norm" and not bool(main.any()):
        # uninformative (B = 0) and the gradient-norm fallback asked for: pay for it
        fallback = grad_norm_scores(cands, loss_grads(root, batch, cands))
    return main, fallback
