"""HeteroLoRA's allocation policy: scoring, top-k switching, history — in any training loop.

``P = proxy_batches``, ``R`` = ``realloc_every`` in steps, ``t`` = optimizer steps done.

``timing="authors"`` (default; ``dyrealloc_callback.py``: re-allocate when ``batch_idx % N == 0``):
at wrap time every candidate is on; at the first training forward pass of step ``t = 0`` — and,
with ``mode="dynamic"``, of every step whose index within its epoch is a multiple of ``R`` (so also
the first step of every epoch when ``steps_per_epoch`` is known) — a forward pre-hook scores every
candidate (all switched on) and switches the top ``k`` on before that step's forward runs. It
scores the first ``P`` batches of the unshuffled training data of :class:`HeteroLoraData` (the
alpha test: its 1:1 training/validation mix), or without it the batch about to be trained. No step
is spent on scoring. A static allocation that does not depend on scores is made at wrap time.

``timing="window"`` (ours):

* at wrap time every candidate is on; with ``proxy="constant"`` (or a budget that keeps every
  candidate) the allocation is made right away and there is no scoring window;
* **first allocation** — the first ``P`` optimizer steps are the scoring window: the training
  forward/backward runs with every candidate on, the step's own gradients give the proxy (no extra
  pass for ``grad_norm``/``snip``; SynFlow and the alpha test run their passes on the step's batch),
  and the adapter gradients are then dropped, so no adapter weight moves — each module starts
  training from its initial weights, exactly as if it had been scored before training. After the
  ``P``-th step the top ``k`` candidates stay on;
* **dynamic re-allocations** — every ``R`` steps after that: each of the last ``min(P, R)`` steps
  before it scores its training batch (captured by a forward pre-hook) in an extra pass with every
  candidate switched on, then the top ``k`` are switched on. Training steps always run with exactly
  ``k`` candidates on.

:func:`heterolora_score` replaces the first window by scoring on batches you give before training.
The work runs in global optimizer-step hooks (``step_hooks``), so a plain loop, ``Trainer`` and
``SFTTrainer`` all get it without extra code. Before every optimizer step the (zero) gradients that
switched-off candidates get under DDP are removed. Under ``torch.distributed`` the scores are
averaged over replicas before ranking and the tie-break is seeded by ``(seed, allocation index)``,
so all replicas switch the same modules.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .._base.tuner import adapted_root
from ...runtime.distributed import fsdp_kind, fsdp_model_holding, replica_reduce
from .config import ZERO_AT_INIT, budget_count, realloc_steps
from .data import attached, next_due
from .layer import (FLAG_ALL_ZERO, FLAG_FALLBACK, FLAG_ON, N_ALLOC, N_SCORED, NEXT_ALLOC, STEP, HeteroLoraLayer,
                    finite_score)
from .proxies import BUSY_ATTR, Batch, Candidate, alpha_test_scores, score_batch

RESOLVE = -2  # NEXT_ALLOC: dynamic, the next allocation's step is computed at the next step boundary

LAST_BATCH_ATTR = "_heterolora_last_batch"
CAPTURE_ATTR = "_heterolora_capture_handle"
ENTRY_HOOK_ATTR = "_heterolora_fsdp2_entry_hook"


def candidates(root: nn.Module, adapter: str) -> list[Candidate]:
    return [Candidate(name, module, adapter) for name, module in root.named_modules()
            if isinstance(module, HeteroLoraLayer) and adapter in module._store("A")]


def _default_adapter(root: nn.Module) -> str:
    for module in root.modules():
        if isinstance(module, HeteroLoraLayer):
            return module.active_adapters[0]
    raise ValueError("the model has no HeteroLoRA layers (wrap it with HeteroLoraConfig)")


def training_groups(root: nn.Module) -> dict[str, list[Candidate]]:
    """Candidates per adapter that is active and being trained (its A requires grad)."""
    adapters: list[str] = []
    for module in root.modules():
        if isinstance(module, HeteroLoraLayer) and not module.disable_adapters and not module.merged:
            for adapter in module.active_adapters:
                store = module._store("A")
                if adapter in store and store[adapter].requires_grad and adapter not in adapters:
                    adapters.append(adapter)
    return {adapter: candidates(root, adapter) for adapter in adapters}


def _config(cands: list[Candidate]):
    return cands[0].layer._store("config")[cands[0].adapter]


def read_state(cands: list[Candidate]) -> list[int]:
    return [int(v) for v in cands[0].layer._store("state")[cands[0].adapter].tolist()]


@torch.no_grad()
def write_state(cands: list[Candidate], values: list[int]) -> None:
    for c in cands:
        store = c.layer._store("state")[c.adapter]
        store.copy_(torch.tensor(values, dtype=store.dtype, device=store.device))


def _groups(cands: list[Candidate], ranking: str) -> list[list[int]]:
    if ranking == "combined":
        return [list(range(len(cands)))]
    lora = [i for i, c in enumerate(cands) if c.kind == "lora"]
    shortcut = [i for i, c in enumerate(cands) if c.kind != "lora"]
    return [g for g in (lora, shortcut) if g]


def needs_scoring(cands: list[Candidate], config) -> bool:
    """False when the allocation does not depend on scores (constant proxy, or every candidate kept)."""
    if config.proxy == "constant":
        return False
    return any(budget_count(config.budget, len(g)) < len(g) for g in _groups(cands, config.ranking))


def window_length(cands: list[Candidate], config, n_alloc: int) -> int:
    if not needs_scoring(cands, config):
        return 0
    return config.proxy_batches if n_alloc == 0 else min(config.proxy_batches, realloc_steps(config))


def in_window(cands: list[Candidate], config, state: list[int]) -> bool:
    nxt = state[NEXT_ALLOC]
    return nxt >= 0 and nxt - window_length(cands, config, state[N_ALLOC]) < state[STEP] <= nxt


# ----- scores -------------------------------------------------------------------------------------
@torch.no_grad()
def accumulate(cands: list[Candidate], main: torch.Tensor, fallback: Optional[torch.Tensor]) -> None:
    """Add one batch's scores to the window sums; a batch whose score is not a number (a NaN gradient)
    adds nothing, and the sums saturate at the largest float: the saved sums stay finite."""
    for i, c in enumerate(cands):
        total = c.layer._store("proxy_sum")[c.adapter]
        total.copy_(finite_score(total + finite_score(main[i].to(total))))
        if fallback is not None:
            total = c.layer._store("gradnorm_sum")[c.adapter]
            total.copy_(finite_score(total + finite_score(fallback[i].to(total))))


def choose(scores: list[float], cands: list[Candidate], config, allocation_index: int) -> list[bool]:
    """Top ``k`` per ranking group by score; exact ties (and NaN, ranked last) broken by a seeded draw."""
    # Kept below 2**63: torch seeds are int64, and config.seed may be up to 2**62 (the integer-field cap).
    generator = torch.Generator().manual_seed((config.seed * 1_000_003 + allocation_index) % 2**63)
    on = [False] * len(cands)
    for group in _groups(cands, config.ranking):
        k = budget_count(config.budget, len(group))
        noise = torch.rand(len(group), generator=generator).tolist()
        key = [(-(scores[i] if not math.isnan(scores[i]) else -math.inf), noise[j]) for j, i in enumerate(group)]
        for j in sorted(range(len(group)), key=key.__getitem__)[:k]:
            on[group[j]] = True
    return on


@torch.no_grad()
def allocate(cands: list[Candidate], step: int) -> list[bool]:
    """Switch the top ``k`` on and the rest off from the accumulated scores; record the allocation."""
    config = _config(cands)
    state = read_state(cands)
    n_alloc, n_scored = state[N_ALLOC], max(state[N_SCORED], 1)
    device = cands[0].layer._store("proxy_sum")[cands[0].adapter].device
    main = torch.stack([c.layer._store("proxy_sum")[c.adapter].to(device) for c in cands]).float() / n_scored
    fallback = torch.stack([c.layer._store("gradnorm_sum")[c.adapter].to(device) for c in cands]).float() / n_scored
    main, fallback = replica_reduce([main, fallback])  # every replica allocates from the same mean scores
    all_zero = (config.proxy in ZERO_AT_INIT and needs_scoring(cands, config)
                and bool((main == 0).all()))
    use_fallback = all_zero and config.zero_score_fallback == "grad_norm" and bool((fallback != 0).any())
    if use_fallback:
        warnings.warn(
            f"HeteroLoRA: every {config.proxy} score is exactly zero (B = 0 at initialisation gives zero SNIP/"
            "SynFlow/alpha-test scores); this allocation uses the gradient norm ‖∇A‖+‖∇B‖ instead "
            "(zero_score_fallback='grad_norm'; recorded as fallback).",
            stacklevel=2,
        )
    elif all_zero:
        warnings.warn(
            f"HeteroLoRA: every {config.proxy} score is exactly zero (B = 0 at initialisation gives zero SNIP/"
            "SynFlow/alpha-test scores); this allocation is the seeded random tie-break, as in the authors' code "
            "(recorded as all_zero; zero_score_fallback='grad_norm' ranks by the gradient norm instead).",
            stacklevel=2,
        )
    scores = finite_score(fallback if use_fallback else main).cpu().tolist()
    on = choose(scores, cands, config, n_alloc)
    flags_extra = (FLAG_FALLBACK if use_fallback else 0) | (FLAG_ALL_ZERO if all_zero else 0)
    for c, score, flag in zip(cands, scores, on):
        layer, a = c.layer, c.adapter
        layer.set_on(a, flag)
        layer._store("proxy_last")[a].fill_(score)
        layer._store("proxy_sum")[a].zero_()
        layer._store("gradnorm_sum")[a].zero_()
        slot = n_alloc % layer._store("hist_step")[a].numel()  # ring buffer of history_size entries
        layer._store("hist_step")[a][slot] = step
        layer._store("hist_proxy")[a][slot] = score
        layer._store("hist_flags")[a][slot] = (FLAG_ON if flag else 0) | flags_extra
    write_state(cands, [state[STEP], n_alloc + 1, 0, RESOLVE if config.mode == "dynamic" else -1])
    return on


def resolve_next(cands: list[Candidate], state: list[int]) -> list[int]:
    """Turn ``RESOLVE`` into the step of the next allocation (needs ``steps_per_epoch`` for a fractional
    ``realloc_every``, which ``HeteroLoraData`` may only set when training starts)."""
    if state[NEXT_ALLOC] != RESOLVE:
        return state
    state[NEXT_ALLOC] = _next_of(cands, state)
    write_state(cands, state)
    return state


def _next_of(cands: list[Candidate], state: list[int]) -> int:
    config = _config(cands)
    layer, adapter = cands[0].layer, cands[0].adapter
    last = int(layer._store("hist_step")[adapter][(state[N_ALLOC] - 1) % layer._store("hist_step")[adapter].numel()])
    if config.timing == "window":  # allocate after the step that ends R steps after the last allocation
        return last + realloc_steps(config) - 1
    return next_due(config, last)  # before the next step whose index within the epoch is a multiple of R


def init_allocation(root: nn.Module, adapter: str) -> None:
    """Fresh timeline at wrap time: all on and a first scoring window — or the allocation right away."""
    cands = candidates(root, adapter)
    if not cands:
        return
    config = _config(cands)
    for c in cands:
        c.layer.set_on(c.adapter, True)
    if config.timing == "authors" and (needs_scoring(cands, config) or config.mode == "dynamic"):
        write_state(cands, [0, 0, 0, 0])  # before the first training step
    elif needs_scoring(cands, config):
        write_state(cands, [0, 0, 0, config.proxy_batches - 1])
    else:
        write_state(cands, [0, 0, 0, -1])
        allocate(cands, step=0)


# ----- the training-time hooks ------------------------------------------------------------------
def capture_batch(root: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: remember the latest training batch; with ``timing="authors"`` allocate before
    the first training forward of a step that is due."""
    if not (root.training and torch.is_grad_enabled() and not root.__dict__.get(BUSY_ATTR, False)):
        return
    object.__setattr__(root, LAST_BATCH_ATTR, (args, kwargs))
    _allocate_if_due(root, (args, kwargs))


def attach_sharded_entry(root: nn.Module, model: nn.Module) -> None:
    """``model`` is the FSDP model (fully_shard root or FSDP1 wrapper) that holds ``root``: allocate (authors'
    timing) in a forward pre-hook of ``model`` that runs before FSDP's forward, so that the scoring passes go
    through ``model`` outside any FSDP forward (inside ``root``'s forward the root unit is already gathered)."""
    from .proxies import ENTRY_ATTR

    if model is root or fsdp_model_holding(model, root) is None:
        return
    object.__setattr__(root, ENTRY_ATTR, weakref.ref(model))
    if model.__dict__.get(ENTRY_HOOK_ATTR) is None:
        def before_fsdp_forward(module, args, kwargs):
            if root.training and torch.is_grad_enabled() and not root.__dict__.get(BUSY_ATTR, False):
                _allocate_if_due(root, (args, kwargs))

        object.__setattr__(model, ENTRY_HOOK_ATTR, model.register_forward_pre_hook(
            before_fsdp_forward, with_kwargs=True, prepend=True))


def _allocate_if_due(root: nn.Module, batch: Batch) -> None:
    for adapter, cands in training_groups(root).items():
        config = _config(cands)
        if config.timing != "authors":
            continue
        state = resolve_next(cands, read_state(cands))
        if 0 <= state[NEXT_ALLOC] <= state[STEP]:
            _allocate_before_step(root, cands, config, batch, state)


def _check_unsharded(cands: list[Candidate], root: nn.Module | None = None) -> None:
    """Under FSDP, scoring goes through the sharded model when one is attached (``attach_sharded_entry``), before
    its forward; without ``root`` (the window timing's pre-step scoring) it is refused."""
    sharding = fsdp_kind(cands[0].a)
    if sharding is not None and root is not None:
        from .proxies import sharded_entry

        sharded_entry(root)  # raises if no fully_shard model is attached
        return
    if sharding is not None:
        raise RuntimeError(
            f"HeteroLoRA scoring under {sharding} is not supported with timing='window': proxy scoring needs the "
            "gradients of whole A/B. Use timing='authors' (the default) with HeteroLoraData attached to the FSDP "
            "model; or DistributedDataParallel; or allocate before sharding (heterolora_score(model, batches)) "
            "with mode='static'."
        )


def score_and_accumulate(root: nn.Module, cands: list[Candidate], config, batches: list[Batch]) -> int:
    """Add the scores of ``batches`` to the window sums; returns how many scores were added.
    The authors' alpha test judges the whole set of batches at once (one score)."""
    if config.proxy == "alpha_test":
        accumulate(cands, alpha_test_scores(root, batches, cands, config.alpha_test_tolerance,
                                            config.alpha_test_metric), None)
        return 1
    for batch in batches:
        main, fallback = score_batch(root, batch, cands, config.proxy, config.alpha_test_tolerance, None,
                                     config.zero_score_fallback)
        accumulate(cands, main, fallback)
    return len(batches)


def _allocate_before_step(root: nn.Module, cands: list[Candidate], config, current: Batch, state: list[int]) -> None:
    if config.mode == "dynamic":
        realloc_steps(config)  # a fractional realloc_every without steps_per_epoch fails before anything trains
    scored = 0
    if needs_scoring(cands, config):
        _check_unsharded(cands, root)
        device = cands[0].a.device
        data = attached(root)
        if config.proxy == "alpha_test":
            if data is None:
                raise ValueError("HeteroLoRA proxy='alpha_test' (the authors' alpha test) needs validation data: "
                                 "pass HeteroLoraData(validation=...) as a Trainer callback or .attach(model) it "
                                 "(or use proxy='alpha_test_delta', which scores the training loss)")
            batches = [_as_batch(b, device) for b in data.mixed_batches(config.proxy_batches, device,
                                                                          state[N_ALLOC])]
        else:
            fixed = data.scoring_batches(config.proxy_batches, device) if data is not None else None
            batches = [_as_batch(b, device) for b in fixed] if fixed else [current]
        for c in cands:
            c.layer._store("proxy_sum")[c.adapter].zero_()
            c.layer._store("gradnorm_sum")[c.adapter].zero_()
        scored = score_and_accumulate(root, cands, config, batches)
    write_state(cands, [state[STEP], state[N_ALLOC], scored, state[NEXT_ALLOC]])
    allocate(cands, step=state[STEP])
    resolve_next(cands, read_state(cands))


def install_hooks(root: nn.Module) -> None:
    from ...runtime.step_hooks import register_step_callbacks

    register_step_callbacks(root, "heterolora_allocation", pre=pre_step, post=post_step)
    if root.__dict__.get(CAPTURE_ATTR) is None:
        object.__setattr__(root, CAPTURE_ATTR, root.register_forward_pre_hook(capture_batch, with_kwargs=True))


def _last_batch(root: nn.Module) -> Batch:
    batch = root.__dict__.get(LAST_BATCH_ATTR)
    if batch is None:
        raise RuntimeError("HeteroLoRA: an optimizer step ran in a scoring window without a training forward pass "
                           "of the model before it, so there is no batch to score")
    return batch


def pre_step(root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Before each optimizer step: score in a window; drop gradients the optimizer must not apply."""
    for adapter, cands in training_groups(root).items():
        config = _config(cands)
        state = read_state(cands)
        if config.timing == "window":
            state = resolve_next(cands, state)
        if config.timing == "window" and in_window(cands, config, state):
            _check_unsharded(cands)
            if state[N_ALLOC] == 0:
                # First window: every candidate was on in this step's forward, so its gradients are the proxy's.
                grads = [(c.a.grad, c.b.grad) for c in cands]
                batch = _last_batch(root) if config.proxy not in ("grad_norm", "snip") else None
                main, fallback = score_batch(root, batch, cands, config.proxy, config.alpha_test_tolerance, grads,
                                             config.zero_score_fallback)
                for c in cands:  # scoring only: no adapter weight moves in this window
                    c.a.grad = None
                    c.b.grad = None
            else:
                main, fallback = score_batch(root, _last_batch(root), cands, config.proxy,
                                             config.alpha_test_tolerance, None, config.zero_score_fallback)
            accumulate(cands, main, fallback)
            state[N_SCORED] += 1
            write_state(cands, state)
        for c in cands:
            if not c.on:  # zero gradients from the DDP tie: no momentum / weight decay on switched-off modules
                c.a.grad = None
                c.b.grad = None


def post_step(root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """After each optimizer step: allocate at the end of a window, advance the step counter."""
    for adapter, cands in training_groups(root).items():
        state = read_state(cands)
        t = state[STEP]
        if _config(cands).timing == "window" and state[NEXT_ALLOC] >= 0 and t >= state[NEXT_ALLOC]:
            allocate(cands, step=t + 1)
            state = read_state(cands)
        state[STEP] = t + 1
        write_state(cands, state)


# ----- public helpers ---------------------------------------------------------------------------
def _as_batch(batch: Any, device: torch.device) -> Batch:
    move = lambda v: v.to(device) if torch.is_tensor(v) else v  # noqa: E731
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return (), {k: move(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return tuple(move(v) for v in batch), {}
    return (move(batch),), {}


def _model_candidates(model: nn.Module, adapter_name: Optional[str]) -> tuple[nn.Module, str, list[Candidate]]:
    """(adapted root, adapter, its candidates) of a wrapped model; refuses an adapter with no HeteroLoRA layers."""
    root = adapted_root(model)
    adapter = adapter_name or _default_adapter(root)
    cands = candidates(root, adapter)
    if not cands:
        raise ValueError(f"adapter_name={adapter!r} is not allowed; the model has no HeteroLoRA layers for it")
    return root, adapter, cands


def heterolora_score(model: nn.Module, batches: Iterable, adapter_name: Optional[str] = None,
                     validation: Optional[Iterable] = None) -> dict:
    """Score every candidate on the first ``proxy_batches`` of ``batches`` and allocate now.

    Batches are dicts of tensors as the model's forward takes them (with ``labels`` for the
    loss-based proxies), e.g. an unshuffled ``DataLoader`` of the training set. ``proxy="alpha_test"``
    also needs ``validation`` batches: it scores the first ``proxy_batches`` of their 1:1 mix with
    ``batches``. Returns :func:`heterolora_allocation`.
    """
    root, adapter, cands = _model_candidates(model, adapter_name)
    config = _config(cands)
    device = cands[0].a.device
    state = read_state(cands)
    for c in cands:  # scores of an unfinished training window would mix with these
        c.layer._store("proxy_sum")[c.adapter].zero_()
        c.layer._store("gradnorm_sum")[c.adapter].zero_()
    if config.proxy == "alpha_test":
        if validation is None:
            raise ValueError("heterolora_score: validation=None is not allowed with proxy='alpha_test' (the authors' "
                             "alpha test judges a 1:1 mix of training and validation batches); pass validation "
                             "batches, or use proxy='alpha_test_delta'")
        from .data import HeteroLoraData

        chosen = HeteroLoraData(train=list(batches), validation=list(validation), seed=config.seed).mixed_batches(
            config.proxy_batches, device, state[N_ALLOC])
    else:
        chosen = list(itertools.islice(iter(batches), config.proxy_batches))
    if not chosen:
        raise ValueError("heterolora_score: batches is empty, which is not allowed; give at least one batch")
    scored = score_and_accumulate(root, cands, config, [_as_batch(b, device) for b in chosen])
    write_state(cands, [state[STEP], state[N_ALLOC], scored, state[NEXT_ALLOC]])
    allocate(cands, step=state[STEP])
    return heterolora_allocation(model, adapter)


def heterolora_allocation(model: nn.Module, adapter_name: Optional[str] = None) -> dict:
    """Which candidates are on, with their latest proxy scores, and the saved allocation history.

    ``modules`` maps each candidate (module name relative to the transformers model) to its
    ``kind`` (``"lora"`` or a shortcut kind), ``on`` and ``score`` (the score the latest allocation
    used; NaN before the first — nothing non-finite is saved: "no score yet" is ``allocations == 0``).
    ``history`` lists the last ``history_size`` allocations, oldest
    first, each with the optimizer ``step`` count it was made after, the modules switched ``on``,
    all ``scores``, whether the proxy's scores were ``all_zero`` (then, by default, the allocation is
    the seeded tie-break) and whether the gradient-norm ``fallback`` was used instead
    (``zero_score_fallback="grad_norm"``).
    """
    _, adapter, cands = _model_candidates(model, adapter_name)
    config = _config(cands)
    state = read_state(cands)
    if state[NEXT_ALLOC] == RESOLVE:  # report the pending schedule without changing the state
        try:
            state[NEXT_ALLOC] = _next_of(cands, state)
        except ValueError:  # a fractional realloc_every before steps_per_epoch is known
            state[NEXT_ALLOC] = -1
    scored = state[N_ALLOC] > 0
    modules = {c.name: {"kind": c.kind, "on": c.on,
                        "score": float(c.layer._store("proxy_last")[c.adapter]) if scored else math.nan}
               for c in cands}
    history = []
    size = cands[0].layer._store("hist_step")[adapter].numel()
    count = min(state[N_ALLOC], size)
    for i in range(state[N_ALLOC] - count, state[N_ALLOC]):
        slot = i % size
        flags = {c.name: int(c.layer._store("hist_flags")[c.adapter][slot]) for c in cands}
        history.append({
            "allocation": i,
            "step": int(cands[0].layer._store("hist_step")[adapter][slot]),
            "on": [name for name, f in flags.items() if f & FLAG_ON],
            "scores": {c.name: float(c.layer._store("hist_proxy")[c.adapter][slot]) for c in cands},
            "all_zero": any(f & FLAG_ALL_ZERO for f in flags.values()),
            "fallback": any(f & FLAG_FALLBACK for f in flags.values()),
        })
    return {
        "adapter": adapter,
        "proxy": config.proxy,
        "mode": config.mode,
        "ranking": config.ranking,
        "budget": config.budget,
        "step": state[STEP],
        "allocations": state[N_ALLOC],
        "phase": "scoring" if state[N_ALLOC] == 0 else "allocated",
        "timing": config.timing,
        # window: the allocation follows that many steps; authors: it precedes step ``next_allocation_before_step``
        "next_allocation_after_step": state[NEXT_ALLOC] + 1 if state[NEXT_ALLOC] >= 0 and config.timing == "window"
        else None,
        "next_allocation_before_step": state[NEXT_ALLOC] if state[NEXT_ALLOC] >= 0 and config.timing == "authors"
        else None,
        "candidates": len(cands),
        "switched_on": sum(c.on for c in cands),
        "modules": modules,
        "history": history,
    }
