"""Per-optimizer-step work that happens by itself under any training loop.

Nothing in transformers or TRL calls a tuner's per-step method (AdaLoRA's ``update_and_allocate``
is silently skipped under ``Trainer``). So the methods of this package attach their training-time
work to PyTorch's *global* optimizer step hooks: a registered model's callbacks run whenever an
optimizer steps that holds at least one of the model's trainable parameters — in a plain loop,
HF ``Trainer`` and TRL ``SFTTrainer`` alike, once per optimizer step (after gradient accumulation
and clipping). Models are held by weak reference. Under DeepSpeed ZeRO, whose inner optimizer holds
none of the model's parameters, ``deepspeed_steps`` runs the same callbacks at the engine's step.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .deepspeed_steps import install_if_loaded

# callback(model, optimizer) -> None
StepCallback = Callable[[nn.Module, torch.optim.Optimizer], None]

_CALLBACKS: "weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[StepCallback | None, StepCallback | None, bool]]]" = (
    weakref.WeakKeyDictionary()
)
_HANDLES: list = []
# Per model: ids of the optimizers that stepped in the current training step, per optimizer id whether
# its running step carries the callbacks, and the model's training-forward count when the step began.
_ROUNDS: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_FORWARDS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_FORWARD_HOOK_ATTR = "_lowrank_step_forward_counter"
_IN_CALLBACKS = [False]


def register_step_callbacks(
    model: nn.Module, key: str, pre: StepCallback | None = None, post: StepCallback | None = None,
    reads_whole_tensors: bool = True,
) -> None:
    """Run ``pre``/``post`` around every optimizer step that updates ``model`` (idempotent per ``key``).

    ``reads_whole_tensors=False`` marks callbacks that only run the model (forward passes) and never read
    parameters or gradients directly: under DeepSpeed ZeRO-3 they run before the parameters are gathered
    (a forward inside a gathered block cannot release them), see ``deepspeed_steps``.
    """
    if not _HANDLES:
        _HANDLES.append(register_optimizer_step_pre_hook(lambda opt, a, k: _run(opt, 0)))
        _HANDLES.append(register_optimizer_step_post_hook(lambda opt, a, k: _run(opt, 1)))
    _CALLBACKS.setdefault(model, {})[key] = (pre, post, reads_whole_tensors)
    if model.__dict__.get(_FORWARD_HOOK_ATTR) is None:
        object.__setattr__(model, _FORWARD_HOOK_ATTR, model.register_forward_pre_hook(_count_training_forward))


def _count_training_forward(model: nn.Module, args) -> None:
    if torch.is_grad_enabled() and not _IN_CALLBACKS[0]:
        _FORWARDS[model] = _FORWARDS.get(model, 0) + 1
        install_if_loaded()


def registered_models() -> list[nn.Module]:
    """The models that have step callbacks."""
    return list(_CALLBACKS.keys())


def unregister_step_callbacks(model: nn.Module, key: str) -> None:
    """Stop the callbacks registered for ``model`` under ``key`` (no-op if there are none)."""
    callbacks = _CALLBACKS.get(model)
    if callbacks is not None:
        callbacks.pop(key, None)
        if not callbacks:
            del _CALLBACKS[model]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the model's adapter layers (all trainable ones if it has none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    seen: set[int] = set()
    params = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for p in module.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params or [p for p in model.parameters() if p.requires_grad]


def optimizer_updates(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    """Whether ``optimizer`` holds any trainable adapter parameter of ``model``."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return any(id(p) in held for p in adapter_parameters(model))


def _starts_training_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Called at an optimizer's pre-step: whether this step carries the model's per-step work."""
    stepped, carries, mark = _ROUNDS.setdefault(model, [set(), {}, None])
    key = id(optimizer)
    forwards = _FORWARDS.get(model, 0)
    first = not stepped or key in stepped or forwards != mark
    if first:
        stepped.clear()
        carries.clear()
        _ROUNDS[model][2] = forwards
    stepped.add(key)
    carries[key] = first
    return first


def _run(optimizer: torch.optim.Optimizer, which: int) -> None:
    if not _CALLBACKS or _IN_CALLBACKS[0]:  # a step taken by a callback (AutoLoRA's look-ahead) is not a training step
        return
    for model, callbacks in list(_CALLBACKS.items()):
        active = [cb[which] for cb in callbacks.values() if cb[which] is not None]
        if which == 0:  # the pre-step decides, once per optimizer step, whether this step carries the work
            carries = optimizer_updates(optimizer, model) and _starts_training_step(model, optimizer)
        else:  # ... and the post-step reads that decision instead of walking the model again
            carries = _ROUNDS.get(model, [set(), {}, None])[1].get(id(optimizer), False)
        if carries:
            _call(model, optimizer, active)


def run_model_callbacks(model: nn.Module, optimizer, which: int, reads_whole_tensors: bool) -> None:
    """Run ``model``'s pre (``which=0``) or post (1) callbacks registered with ``reads_whole_tensors`` now: for
    loops whose optimizer steps are not torch optimizer steps of the model's parameters (``deepspeed_steps``)."""
    callbacks = _CALLBACKS.get(model, {})
    _call(model, optimizer, [cb[which] for cb in callbacks.values()
                             if cb[which] is not None and cb[2] == reads_whole_tensors])


def _call(model: nn.Module, optimizer, active: list[StepCallback]) -> None:
    _IN_CALLBACKS[0] = True
    try:
        for callback in active:
            callback(model, optimizer)
    finally:
        _IN_CALLBACKS[0] = False
