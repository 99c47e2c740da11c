"""AutoLoRA's bi-level step: β learns on held-out data every ``search_every`` optimizer steps, in any loop.

At an optimizer step that updates an AutoLoRA model in its search phase (``step_hooks``), before
A and B move, with ``w`` the weights, ``g = ∇_w L_train(w, β)`` the gradient the loop just computed
and ``v = ∇_w L_val`` at the look-ahead weights:

* ``first_order``: ``g_β = ∇_β L_val(w, β)``.
* ``darts_real_step`` (the authors' search: betty's ``darts`` with roll-back): the optimizer takes its
  real step on ``g`` to ``w'`` (its state is saved first); ``g_β = ∇_β L_val(w', β) −
  [∇_β L_train(w' + εv) − ∇_β L_train(w' − εv)] / 2ε`` with ``ε = fd_epsilon / ‖v‖`` — no
  learning-rate factor on the implicit term; then weights and optimizer state are restored and the
  loop's own step proceeds. (The authors redo that step's gradient with the new β; here it keeps the
  gradient the loop computed before β moved — one β step of difference.)
* ``darts_virtual_sgd`` (the DARTS paper's form): the look-ahead is a virtual SGD step
  ``w' = w − ξ g`` (``ξ`` = the optimizer's lr unless ``virtual_lr``) and
  ``g_β = ∇_β L_val(w', β) − ξ [∇_β L_train(w + εv) − ∇_β L_train(w − εv)] / 2ε``.

The training batch of the implicit terms is the one of the latest training forward pass. Then β
takes one Adam step (moments kept in buffers). Under ``torch.distributed`` (DDP) ``v`` and ``g_β``
are averaged over the replicas first (each may hold its own held-out shard), so every replica takes
the same β step — the one a single process takes on the concatenated batches. FSDP is refused (the
passes would run on sharded A/B). The held-out data comes from one object, :class:`AutoLoraSearch`;
a search step without it raises instead of silently training plain LoRA.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .._base.tuner import adapted_root, unwrap_data_parallel
from ...runtime.distributed import deepspeed_managed, fsdp_kind, fsdp_model_holding, replica_reduce
from .layer import AutoLoraLayer

SEARCH_ATTR = "_autolora_search"
LAST_BATCH_ATTR = "_autolora_last_train_batch"
BUSY_ATTR = "_autolora_in_meta_step"
COUNT_ATTR = "_autolora_search_steps"
ENTRY_ATTR = "_autolora_entry_module"


class AutoLoraSearch(TrainerCallback):
    """The held-out data that trains AutoLoRA's selection variables β — the one thing only you can give.

    ``held_out``: an iterable of ready batches (dicts of tensors including ``labels``), or a
    sequence of examples (e.g. a ``datasets.Dataset``) batched with ``collate_fn`` (under
    ``Trainer``/``SFTTrainer`` the trainer's own data collator is used when none is given).

    * ``Trainer`` / ``SFTTrainer``: ``callbacks=[AutoLoraSearch(held_out)]``.
    * Plain PyTorch loop: ``AutoLoraSearch(held_out).attach(model)`` once before training.
    """

    def __init__(self, held_out: Iterable, batch_size: int = 8, collate_fn=None, seed: int = 0):
        if held_out is None:
            raise ValueError("AutoLoraSearch.held_out=None is not allowed; it must be a non-empty dataset or batches")
        if hasattr(held_out, "__len__") and len(held_out) == 0:
            raise ValueError("AutoLoraSearch.held_out is empty, which is not allowed; give at least one example")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"AutoLoraSearch.batch_size={batch_size!r} is not allowed; it must be an integer >= 1")
        self.held_out = held_out
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.seed = seed
        self._iterator: Iterator | None = None

    # ----- wiring -----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "AutoLoraSearch":
        root = adapted_root(unwrap_data_parallel(model))
        if not any(isinstance(m, AutoLoraLayer) for m in root.modules()):
            raise ValueError("AutoLoraSearch.attach: the model has no AutoLoRA layers (wrap it with AutoLoraConfig)")
        object.__setattr__(root, SEARCH_ATTR, self)
        # The module the user trains (the PeftModel; with FSDP2 the fully_shard root, with FSDP1 its wrapper): under
        # FSDP the held-out pass goes through it, as the root unit gathers the embeddings and head in its forward.
        object.__setattr__(root, ENTRY_ATTR, weakref.ref(model))
        return self

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.collate_fn is None and train_dataloader is not None and not self._is_batches():
            self.collate_fn = train_dataloader.collate_fn
        self.attach(model)

    # ----- data -------------------------------------------------------------------------------
    def _is_batches(self) -> bool:
        first = next(iter(self.held_out))
        return isinstance(first, dict) and all(torch.is_tensor(v) for v in first.values()) and self.collate_fn is None \
            and not hasattr(self.held_out, "column_names")

    def _batches(self) -> Iterator[dict[str, Any]]:
        if self._is_batches():
            return itertools.cycle(self.held_out)
        if self.collate_fn is None:
            raise ValueError("AutoLoraSearch.collate_fn=None is not allowed for a dataset of examples outside a "
                             "Trainer; pass collate_fn, or pass ready batches")
        loader = torch.utils.data.DataLoader(self.held_out, batch_size=self.batch_size, shuffle=True,
                                             collate_fn=self.collate_fn,
                                             generator=torch.Generator().manual_seed(self.seed))

        def forever():
            while True:
                yield from loader

        return forever()

    def next_batch(self, device: torch.device) -> dict[str, Any]:
        if self._iterator is None:
            self._iterator = self._batches()
        batch = next(self._iterator)
        if "labels" not in batch:
            raise ValueError("AutoLoraSearch: held-out batches must contain 'labels' to compute the validation loss")
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----- the step ---------------------------------------------------------------------------------
def capture_train_batch(root: nn.Module, args, kwargs) -> None:
    """Forward pre-hook: remember the latest training batch (for the implicit term of the DARTS forms)."""
    if root.training and torch.is_grad_enabled() and not getattr(root, BUSY_ATTR, False):
        object.__setattr__(root, LAST_BATCH_ATTR, (args, kwargs))


def _loss(root: nn.Module, args, kwargs) -> torch.Tensor:
    out = root(*args, **kwargs)
    loss = out.loss if hasattr(out, "loss") else out[0]
    if loss is None:
        raise ValueError("AutoLoRA: the model returned no loss; batches must contain labels")
    return loss


def _searching_layers(root: nn.Module) -> list[tuple[AutoLoraLayer, str]]:
    out = []
    for module in root.modules():
        if isinstance(module, AutoLoraLayer) and not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in module._store("A") and module._store("config")[adapter].phase == "search":
                    out.append((module, adapter))
    return out


def search_step(root: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The bi-level update of β for every AutoLoRA layer in its search phase (pre optimizer step)."""
    layers = _searching_layers(root)
    if not layers:
        return
    config = layers[0][0]._store("config")[layers[0][1]]
    sharding = fsdp_kind(layers[0][0]._store("A")[layers[0][1]])
    entry = _sharded_entry(root) if sharding is not None else None
    if sharding is not None and config.hypergradient != "first_order":
        raise RuntimeError(
            f"AutoLoRA search with hypergradient={config.hypergradient!r} under {sharding} is not supported: it "
            "moves or reads whole A/B outside FSDP's forward, where each rank holds a shard. Use "
            "hypergradient='first_order' (the default) under FSDP, or search with DistributedDataParallel."
        )
    if sharding is not None and entry is None:
        raise RuntimeError(
            f"AutoLoRA search phase under {sharding}: AutoLoraSearch is attached to a module inside the FSDP model, "
            "but the held-out pass must go through the FSDP model itself (its root unit gathers the embeddings and "
            "head). Attach it to the fully_shard / FullyShardedDataParallel model you train: "
            "AutoLoraSearch(held_out).attach(fsdp_model)."
        )
    if config.hypergradient != "first_order" and deepspeed_managed(layers[0][0]._store("A")[layers[0][1]]):
        raise RuntimeError(
            f"AutoLoRA search with hypergradient={config.hypergradient!r} under DeepSpeed ZeRO is not supported: "
            "it steps (or rolls back) the weights with the optimizer, and ZeRO's optimizer updates its own fp32 "
            "partitions, which cannot be rolled back. Use hypergradient='first_order' (the default) under ZeRO, "
            "or search with DistributedDataParallel."
        )
    search = getattr(root, SEARCH_ATTR, None)
    if search is None:
        raise RuntimeError(
            "AutoLoRA search phase: an optimizer step ran without held-out data, so the selection variables β "
            "cannot learn and this would silently train plain LoRA. Pass callbacks=[AutoLoraSearch(held_out)] to "
            "Trainer/SFTTrainer, or call AutoLoraSearch(held_out).attach(model) in a plain loop; after the search "
            "call autolora_select(model)."
        )
    count = getattr(root, COUNT_ATTR, 0)
    object.__setattr__(root, COUNT_ATTR, count + 1)
    if count % config.search_every:
        return
    weights = [layer._store(k)[a] for layer, a in layers for k in ("A", "B")]
    originals = [layer._store("beta")[a] for layer, a in layers]
    betas = [b.detach().clone().requires_grad_(True) for b in originals]
    for (layer, a), beta in zip(layers, betas):
        layer._store("beta")[a] = beta
    object.__setattr__(root, BUSY_ATTR, True)
    try:
        with torch.enable_grad():
            val = search.next_batch(weights[0].device)
            if config.hypergradient == "first_order":
                grads = torch.autograd.grad(_loss(root if entry is None else entry, (), val), betas, allow_unused=True)
            elif config.hypergradient == "darts_real_step":
                grads = _darts_real_step(root, optimizer, config, weights, betas, val)
            else:
                grads = _darts_virtual_sgd(root, optimizer, config, weights, betas, val)
            # Data parallel: each replica saw its own held-out (and training) batch; the mean is the
            # hypergradient of the concatenated batches, so every replica takes the same β step.
            grads = replica_reduce(list(grads))
    finally:
        object.__setattr__(root, BUSY_ATTR, False)
        for (layer, a), beta in zip(layers, originals):
            layer._store("beta")[a] = beta
    for (layer, a), grad in zip(layers, grads):
        if grad is not None:
            _adam_update(layer, a, grad.detach(), config)


def _sharded_entry(root: nn.Module) -> nn.Module | None:
    """The module AutoLoraSearch was attached to, if it is an FSDP model that holds ``root``."""
    ref = getattr(root, ENTRY_ATTR, None)
    return fsdp_model_holding(ref() if ref is not None else None, root)


def _lr_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def _last_train_batch(root):
    last = getattr(root, LAST_BATCH_ATTR, None)
    if last is None:
        raise RuntimeError("AutoLoRA DARTS step: no training forward pass was seen before the optimizer step")
    return last


def _held_out_gradients(root, weights, betas, val):
    """``∇_β L_val`` and ``v = ∇_w L_val`` (averaged over replicas: the same ``w ± εv`` everywhere)."""
    grads = torch.autograd.grad(_loss(root, (), val), betas + weights, allow_unused=True)
    v = [torch.zeros_like(w) if g is None else g for g, w in zip(grads[len(betas):], weights)]
    return grads[: len(betas)], replica_reduce(v)


def _implicit_term(root, weights, betas, center, v, config):
    """``[∇_β L_train(c + εv) − ∇_β L_train(c − εv)] / 2ε`` with ``ε = fd_epsilon / ‖v‖`` (weights left at c+εv)."""
    last = _last_train_batch(root)
    eps = config.fd_epsilon / torch.cat([x.flatten() for x in v]).norm().clamp_min(1e-12)
    fd = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for w, c, d in zip(weights, center, v):
                w.copy_(c + sign * eps * d)
        fd.append(torch.autograd.grad(_loss(root, *last), betas, allow_unused=True))
    return [None if gp is None or gm is None else (gp - gm) / (2 * eps) for gp, gm in zip(*fd)]


def _combine(g_val, implicit, factor):
    return [gv if gv is None or h is None else gv - factor * h for gv, h in zip(g_val, implicit)]


def _darts_virtual_sgd(root, optimizer, config, weights, betas, val):
    _last_train_batch(root)
    xi = config.virtual_lr if config.virtual_lr is not None else _lr_of(optimizer, weights[0])
    backup = [w.detach().clone() for w in weights]
    train_grads = [torch.zeros_like(w) if w.grad is None else w.grad.detach() for w in weights]
    try:
        with torch.no_grad():
            for w, g in zip(weights, train_grads):
                w.sub_(xi * g)
        g_val, v = _held_out_gradients(root, weights, betas, val)
        implicit = _implicit_term(root, weights, betas, backup, v, config)
    finally:
        with torch.no_grad():
            for w, b in zip(weights, backup):
                w.copy_(b)
    return _combine(g_val, implicit, xi)


def _darts_real_step(root, optimizer, config, weights, betas, val):
    _last_train_batch(root)
    moved = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    backup = [p.detach().clone() for p in moved]
    state = {p: _clone_state(optimizer.state[p]) for p in moved if p in optimizer.state}
    try:
        optimizer.step()  # the real step (step_hooks ignores steps taken inside a callback)
        looked_ahead = [w.detach().clone() for w in weights]
        g_val, v = _held_out_gradients(root, weights, betas, val)
        implicit = _implicit_term(root, weights, betas, looked_ahead, v, config)
    finally:
        with torch.no_grad():
            for p, b in zip(moved, backup):
                p.copy_(b)
        for p in moved:
            if p in state:
                optimizer.state[p] = state[p]
            else:
                optimizer.state.pop(p, None)
    return _combine(g_val, implicit, 1.0)


def _clone_state(state: dict) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


@torch.no_grad()
def _adam_update(layer: AutoLoraLayer, adapter: str, grad: torch.Tensor, config) -> None:
    beta = layer._store("beta")[adapter]
    m, v = layer._store("beta_exp_avg")[adapter], layer._store("beta_exp_avg_sq")[adapter]
    step = layer._store("beta_step")[adapter]
    step.add_(1)
    b1, b2 = config.arch_beta1, config.arch_beta2
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    t = float(step)
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    beta.sub_(config.arch_lr * m_hat / (v_hat.sqrt() + config.arch_eps))
