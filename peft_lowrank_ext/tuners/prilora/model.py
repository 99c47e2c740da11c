"""PRILoRA tuner: depth-dependent ranks on the shared gated layer, pruning after every optimizer step."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import TrainerCallback

from .._base.tuner import adapter_layers
from ..gated.model import GatedTuner
from ...runtime.distributed import distributed_active, fsdp1_whole
from ...runtime.step_hooks import register_step_callbacks
from .config import PriLoraConfig
from .depth import block_position, linear_rank
from .layer import PriLoraLayer, PriLoraLinear, install_token_mask
from .pruning import Schedule, is_prune_step, resolve_schedule, sparsity_at


class PriLoraModel(GatedTuner):
    """Creates a PRILoRA model (use via ``get_peft_model``).

    Benedek, Wolf. PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation. Findings of EACL 2024,
    pp. 252–263. arXiv:2401.11316.

    Block ``l`` of ``L`` gets rank ``r_l`` (linear in ``l``) for all its targets; ``A`` is full size
    for the whole training and is pruned through the layer's persistent element mask by a
    post-optimizer-step callback, so pruning happens by itself in a plain loop, HF ``Trainer`` and
    TRL ``SFTTrainer``. The pruning rule (importance ``|A_ij|·sqrt(n_j)``, schedule) is
    [reconstructed]; see ``pruning.py``.
    """

    prefix: str = "prilr_"
    method_name = "PRILoRA"
    tuner_layer_cls = PriLoraLayer
    linear_cls = PriLoraLinear

    def layer_options(self, config: PriLoraConfig, module_name: str) -> dict:
        index, num_blocks = block_position(self.model, module_name, config.block_index_pattern, config.num_blocks)
        r = linear_rank(config.r_first, config.r_last, index, num_blocks)
        return {"r": r, "lora_alpha": config.lora_alpha, "element_mask": True}

    def combined_config(self, config: PriLoraConfig, rank: int, shortcut_rank: int, target_modules: list[str]):
        """Every block at the same rank (the largest concatenation; unused ranks are masked off)."""
        return dataclasses.replace(
            config, r_first=rank, r_last=rank, r_mean=None, r_spread=None, lora_alpha=float(rank),
            target_modules=target_modules, exclude_modules=None, layers_to_transform=None, layers_pattern=None,
            bias="none")

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        """The shared layer swap, then the layer reads the adapted model's attention mask (``TokenMask``)."""
        super()._create_and_replace(config, adapter_name, target, target_name, parent, current_key, **kwargs)
        layer = getattr(parent, target_name)
        if isinstance(layer, PriLoraLayer):
            layer.set_token_mask(install_token_mask(self.model))

    def _post_injection_hook(self, model: nn.Module, config: PriLoraConfig, adapter_name: str) -> None:
        register_step_callbacks(model, "prilora_prune", post=prilora_post_step)


# ----- the training-time step ---------------------------------------------------------------------
def _training_entries(root: nn.Module) -> list[tuple[PriLoraLayer, str]]:
    return [(m, a) for m in root.modules() if isinstance(m, PriLoraLayer) for a in m.training_adapters()]


def _all_reduce_pending(entries: list[tuple[PriLoraLayer, str]]) -> None:
    """Sum every replica's pending ``Σx²`` and token counts (one collective), so that all replicas fold
    the same statistics into the EMA and take identical pruning decisions."""
    if not distributed_active():
        return
    device = entries[0][0]._store("in_sq_ema")[entries[0][1]].device
    parts = []
    for layer, adapter in entries:
        total, tokens = layer.pending_statistics().get(adapter, (None, 0))
        if total is None:
            total = torch.zeros(layer.in_features)
        tokens = (tokens.reshape(1).to(device, torch.float64) if torch.is_tensor(tokens)
                  else torch.tensor([float(tokens)], dtype=torch.float64, device=device))
        parts += [total.to(device, torch.float64), tokens]
    flat = torch.cat(parts)
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    ends = torch.tensor([layer.in_features + 1 for layer, _ in entries]).cumsum(0)
    counts = flat[(ends - 1).to(device)].tolist()  # one device sync for all token counts
    for (layer, adapter), end, tokens in zip(entries, ends.tolist(), counts):
        layer.pending_statistics()[adapter] = [flat[end - 1 - layer.in_features: end - 1].float(), int(tokens)]


def _schedules(entries: list[tuple[PriLoraLayer, str]]) -> list[Schedule]:
    """Each entry's schedule in steps (one resolution per config and run length); raises before any state changes
    when the run's length is needed and unknown."""
    resolved: dict[tuple[int, int | None], Schedule] = {}
    out = []
    for layer, adapter in entries:
        config = layer._store("config")[adapter]
        total = layer.__dict__.get(_TOTAL_ATTR)
        key = (id(config), total)
        if key not in resolved:
            resolved[key] = resolve_schedule(config, total)
        out.append(resolved[key])
    return out


@torch.no_grad()
def prilora_post_step(root: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """After an optimizer step: fold the step's input statistics into the EMA, advance the schedule,
    and prune the layers whose schedule has a pruning event at the new step."""
    entries = _training_entries(root)
    if not entries:
        return
    schedules = _schedules(entries)
    _all_reduce_pending(entries)
    for layer, adapter in entries:
        layer.commit_statistics(adapter, layer._store("config")[adapter].ema_beta)
        layer._store("step")[adapter].add_(1)
    device = entries[0][0]._store("step")[entries[0][1]].device
    steps = torch.stack([layer._store("step")[a].to(device) for layer, a in entries]).tolist()  # one sync
    due = [(layer, adapter, step, schedule) for (layer, adapter), step, schedule in zip(entries, steps, schedules)
           if is_prune_step(schedule, step)]
    if not due:
        return
    # FSDP1 keeps a flat slice of each A outside forward: prune on the whole tensors (read-only).
    with fsdp1_whole(root, [layer._store("A")[adapter] for layer, adapter, _, _ in due]):
        for layer, adapter, step, schedule in due:
            layer.prune(adapter, step, sparsity_at(layer._store("config")[adapter], step, schedule))


# ----- the run's length ---------------------------------------------------------------------------
_TOTAL_ATTR = "_prilora_total_steps"


def set_prilora_total_steps(model: nn.Module, total_steps: int) -> None:
    """Tell the PRILoRA layers of ``model`` how many optimizer steps the run has, so that schedule fractions
    (``prune_*_fraction``) become steps. Raises ``ValueError`` if that contradicts an adapter's config."""
    from .._base.checks import check_int

    check_int("set_prilora_total_steps", "total_steps", total_steps, minimum=1)
    layers = [m for m in model.modules() if isinstance(m, PriLoraLayer)]
    if not layers:
        raise ValueError("set_prilora_total_steps: model has no PRILoRA layers")
    for layer in layers:
        for config in layer._store("config").values():
            resolve_schedule(config, total_steps)
    for layer in layers:
        layer.__dict__[_TOTAL_ATTR] = int(total_steps)


class PriLoraScheduleCallback(TrainerCallback):
    """``Trainer`` / ``SFTTrainer`` callback: the run's ``state.max_steps`` becomes PRILoRA's total steps.

    Use ``callbacks=[PriLoraScheduleCallback()]``; without it (or ``total_steps`` / absolute steps) the first
    optimizer step raises, since a schedule relative to an unknown run length cannot be followed.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not state.max_steps or state.max_steps < 1:
            raise ValueError(f"PriLoraScheduleCallback: the trainer gave model={type(model).__name__} and "
                             f"max_steps={state.max_steps!r}; a model and max_steps >= 1 are needed")
        set_prilora_total_steps(model, int(state.max_steps))


# ----- inspection -------------------------------------------------------------------------------
def _layers(model: nn.Module, adapter_name: str | None):
    return adapter_layers(model, PriLoraLayer, adapter_name, "PRILoRA")


def prilora_ranks(model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
    """Rank ``r_l`` of every PRILoRA module (full module names, as ``export_lora`` writes them)."""
    return {name: layer._store("r")[a] for name, layer, a in _layers(model, adapter_name)}


def prilora_sparsity(model: nn.Module, adapter_name: str | None = None) -> dict[str, float]:
    """Fraction of the entries of ``A`` currently masked, per module."""
    return {name: layer.sparsity(a) for name, layer, a in _layers(model, adapter_name)}


def prilora_step(model: nn.Module, adapter_name: str | None = None) -> int:
    """Optimizer steps the adapter has completed (its position in the pruning schedule)."""
    steps = {int(layer._store("step")[a]) for _, layer, a in _layers(model, adapter_name)}
    return max(steps)
