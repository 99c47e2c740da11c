"""DeepSpeed ZeRO: the per-step work of ``step_hooks`` at the engine's real optimizer step.

ZeRO steps flat fp32 partitions with an inner optimizer that holds none of the model's parameters,
so torch's optimizer-step hooks never see the model and every method's per-step work (PAC-Bayes
gradient, AutoLoRA's β step, PRILoRA's pruning, HeteroLoRA's allocation) would be skipped.

``DeepSpeedEngine.step`` is the one place every DeepSpeed loop goes through once per micro-batch —
HF ``Trainer`` / TRL ``SFTTrainer`` (accelerate calls it right after ``engine.backward``), accelerate,
and a plain ``deepspeed.initialize`` loop — and it applies the optimizer at a gradient-accumulation
boundary. This module wraps that method once (at the first training forward of a registered model
after DeepSpeed was imported). At a boundary, for every registered model inside the engine:

* **pre** callbacks run after ZeRO reduced the gradients and before the update. Each trainable
  parameter's full gradient (``deepspeed.utils.safe_get_full_grad``, the same on every replica) is
  put on ``p.grad``; what the callbacks leave there is written back to ZeRO's partitions
  (``safe_set_full_grad``). ZeRO clips inside its step, after this, so the callbacks see unclipped
  gradients here (under DDP they see the trainer's clipped ones).
* **post** callbacks run after the update (skipped if ZeRO skipped it on overflow).

Under ZeRO-3 the model's parameters are gathered (read-only) while the callbacks run, so they see
whole tensors (callbacks registered with ``reads_whole_tensors=False``, which only run forward passes,
run first, ungathered); a callback that writes parameter values would be lost, and none does (PRILoRA prunes
through a mask buffer). Callbacks get ``engine.optimizer`` (ZeRO's), which is not a torch optimizer:
work that must step or roll back the optimizer (AutoLoRA's DARTS hypergradients) refuses it.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch
from torch import nn

_WRAPPED_ATTR = "_lowrank_steps_wrapped"
_MODELS_ATTR = "_lowrank_registered_models"


def install_if_loaded() -> None:
    """Wrap ``DeepSpeedEngine.step`` if DeepSpeed is imported (cheap check; idempotent)."""
    if "deepspeed.runtime.engine" not in sys.modules:
        return
    engine_cls = sys.modules["deepspeed.runtime.engine"].DeepSpeedEngine
    if getattr(engine_cls.step, _WRAPPED_ATTR, False):
        return
    original = engine_cls.step

    @functools.wraps(original)
    def step(engine, *args, **kwargs):
        models = _registered_models(engine)
        if not models or not engine.is_gradient_accumulation_boundary():
            return original(engine, *args, **kwargs)
        for model in models:
            _run(model, engine.optimizer, which=0, reads_whole_tensors=False)
            _release_leftovers(engine)
            _run_with_full_gradients(engine, model)
        result = original(engine, *args, **kwargs)
        if engine.was_step_applied():
            for model in models:
                _run(model, engine.optimizer, which=1, reads_whole_tensors=False)
                with _gathered(model):
                    _run(model, engine.optimizer, which=1, reads_whole_tensors=True)
        return result

    setattr(step, _WRAPPED_ATTR, True)
    engine_cls.step = step


def _registered_models(engine) -> list[nn.Module]:
    """The registered models inside ``engine.module``; the module walk is cached per engine until the set of
    registered models changes (this runs at every micro-batch)."""
    from .step_hooks import registered_models

    registered = registered_models()
    if not registered:
        return []
    ids = frozenset(id(m) for m in registered)
    cached = engine.__dict__.get(_MODELS_ATTR)
    if cached is None or cached[0] != ids:
        cached = (ids, [m for m in engine.module.modules() if id(m) in ids])
        engine.__dict__[_MODELS_ATTR] = cached
    return cached[1]


def _release_leftovers(engine) -> None:
    """ZeRO-3, after a callback's own forward/backward (AutoLoRA's held-out pass, gradients for β only):
    the modules whose post-backward hook did not fire keep their parameters gathered; release them as
    DeepSpeed does after its own backward, before gathering for the next callbacks."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is not None:
        offload.partition_all_parameters()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def _gathered(model: nn.Module):
    """ZeRO-3: every parameter of ``model`` whole (read-only) inside the block; otherwise nothing."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]  # partitioned by ZeRO-3
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _run_with_full_gradients(engine, model: nn.Module) -> None:
    from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

    params = _trainable(model)
    with _gathered(model):
        originals = []
        for p in params:  # collective per parameter, in the same order on every replica
            grad = safe_get_full_grad(p)
            originals.append(grad)
            p.grad = None if grad is None else grad.detach().clone().reshape(p.shape).to(p.dtype)
        try:
            _run(model, engine.optimizer, which=0, reads_whole_tensors=True)
        finally:
            for p, original in zip(params, originals):
                new = p.grad
                p.grad = None
                if original is None:
                    continue
                if new is None:  # a callback dropped it (HeteroLoRA's switched-off candidates): no update
                    new = torch.zeros_like(original)
                new = new.reshape(original.shape).to(original.dtype)
                if not torch.equal(new, original):
                    safe_set_full_grad(p, _padded_for_partitions(p, new))


def _padded_for_partitions(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` flattened and, for a ZeRO-3 parameter, zero-padded to (partition size × replicas): ZeRO-3 pads
    the last partition, and ``safe_set_full_grad`` reads each replica's slice of the padded length."""
    flat = value.reshape(-1)
    partition = getattr(getattr(param, "ds_tensor", None), "ds_numel", None)
    if partition is not None:
        missing = partition * torch.distributed.get_world_size() - flat.numel()
        if missing > 0:
            flat = torch.cat([flat, flat.new_zeros(missing)])
    return flat


def _run(model: nn.Module, optimizer, which: int, reads_whole_tensors: bool) -> None:
    from .step_hooks import run_model_callbacks

    run_model_callbacks(model, optimizer, which, reads_whole_tensors)
