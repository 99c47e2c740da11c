"""AutoLoRA's bi-level step: β learns on held-out data at every optimizer step, in any loop.

At each optimizer step that updates an AutoLoRA model in its search phase (``step_hooks``),
before A and B move:

* first order: ``g_β = ∇_β L_val(w, β)``;
* second order (DARTS, the authors' choice): with the look-ahead ``w' = w − ξ ∇_w L_train(w, β)``
  (``∇_w L_train`` is the gradient the loop just computed, ``ξ`` the optimizer's lr),
  ``g_β = ∇_β L_val(w', β) − ξ [∇_β L_train(w⁺, β) − ∇_β L_train(w⁻, β)] / 2ε`` with
  ``w± = w ± ε v``, ``v = ∇_{w'} L_val(w', β)``, ``ε = fd_epsilon / ‖v‖``; the training batch is
  the one of the latest training forward pass;

then β takes one Adam step (moments kept in buffers). Under ``torch.distributed`` (DDP) ``v`` and
``g_β`` are averaged over the replicas first (each may hold its own held-out shard), so every replica
takes the same β step — the one a single process takes on the concatenated batches. FSDP is refused
(the passes would run on sharded A/B). The held-out data comes from one object,
:class:`AutoLoraSearch`; a search step without it raises instead of silently training plain LoRA.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .._base.tuner import adapted_root
from ...runtime.distributed import fsdp_kind, replica_reduce
from .layer import AutoLoraLayer

SEARCH_ATTR = "_autolora_search"
LAST_BATCH_ATTR = "_autolora_last_train_batch"
BUSY_ATTR = "_autolora_in_meta_step"


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
        root = adapted_root(model)
        if not any(isinstance(m, AutoLoraLayer) for m in root.modules()):
            raise ValueError("AutoLoraSearch.attach: the model has no AutoLoRA layers (wrap it with AutoLoraConfig)")
        object.__setattr__(root, SEARCH_ATTR, self)
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
    """Forward pre-hook: remember the latest training batch (for the second-order term)."""
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
    sharding = fsdp_kind(layers[0][0]._store("A")[layers[0][1]])
    if sharding is not None:
        raise RuntimeError(
            f"AutoLoRA search phase under {sharding} is not supported: the bi-level step runs its own "
            "held-out and look-ahead passes outside FSDP's forward, on sharded A/B. Train the search phase with "
            "DistributedDataParallel (or one process); the selected LoRA retrain can use FSDP."
        )
    search = getattr(root, SEARCH_ATTR, None)
    if search is None:
        raise RuntimeError(
            "AutoLoRA search phase: an optimizer step ran without held-out data, so the selection variables β "
            "cannot learn and this would silently train plain LoRA. Pass callbacks=[AutoLoraSearch(held_out)] to "
            "Trainer/SFTTrainer, or call AutoLoraSearch(held_out).attach(model) in a plain loop; after the search "
            "call autolora_select(model)."
        )
    config = layers[0][0]._store("config")[layers[0][1]]
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
                grads = torch.autograd.grad(_loss(root, (), val), betas, allow_unused=True)
            else:
                grads = _second_order(root, optimizer, config, weights, betas, val)
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


def _lr_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def _second_order(root, optimizer, config, weights, betas, val):
    last = getattr(root, LAST_BATCH_ATTR, None)
    if last is None:
        raise RuntimeError("AutoLoRA second-order step: no training forward pass was seen before the optimizer step")
    xi = config.virtual_lr if config.virtual_lr is not None else _lr_of(optimizer, weights[0])
    backup = [w.detach().clone() for w in weights]
    train_grads = [torch.zeros_like(w) if w.grad is None else w.grad.detach() for w in weights]
    try:
        with torch.no_grad():
            for w, g in zip(weights, train_grads):
                w.sub_(xi * g)
        grads = torch.autograd.grad(_loss(root, (), val), betas + weights, allow_unused=True)
        g_val = grads[: len(betas)]
        v = [torch.zeros_like(w) if g is None else g for g, w in zip(grads[len(betas):], weights)]
        v = replica_reduce(v)  # the held-out gradient of all replicas' batches: the same w± everywhere
        eps = config.fd_epsilon / torch.cat([x.flatten() for x in v]).norm().clamp_min(1e-12)
        fd = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for w, b, d in zip(weights, backup, v):
                    w.copy_(b + sign * eps * d)
            fd.append(torch.autograd.grad(_loss(root, *last), betas, allow_unused=True))
    finally:
        with torch.no_grad():
            for w, b in zip(weights, backup):
                w.copy_(b)
    out = []
    for gv, gp, gm in zip(g_val, *fd):
        if gv is None:
            out.append(None)
            continue
        hessian_term = (gp - gm) / (2 * eps) if gp is not None and gm is not None else 0.0
        out.append(gv - xi * hessian_term)
    return out


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
