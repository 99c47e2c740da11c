"""HeteroLoRA's candidates: LoRA modules and LoRA-adapted shortcuts, both on the shared gated layer.

Every candidate is switched on or off by the gated layer's persistent ``module_on`` buffer (0/1).
A switched-off LoRA module is skipped by :class:`GatedLinear`'s forward, a switched-off shortcut by
its hook, so it costs nothing forward or backward and its parameters get no gradient (``grad`` stays
``None``, so optimizers neither move nor decay them). Parameters keep ``requires_grad=True`` at all
times: the optimizer the trainer builds at the start therefore holds every candidate, and a module
switched on later by a dynamic re-allocation trains normally.

Under ``torch.distributed`` a module that takes no part in the graph would make DDP (with
``find_unused_parameters=False``) fail with "Expected to have finished reduction ...". There a
switched-off candidate adds ``0 · (A[0,0] + B[0,0])`` to its output — a zero contribution of
negligible cost that gives its parameters an exact zero gradient, so every replica reduces the same
buckets. Those zero gradients are removed again before the optimizer step (see ``allocation.py``),
so an off module is not moved by momentum or weight decay either.

Per adapter, the allocation state lives in persistent buffers (saved with the adapter and in every
checkpoint, so ``resume_from_checkpoint`` reproduces the allocation and its history):

* ``state`` (int64, 4): optimizer steps seen, allocations done, batches scored in the current
  window, the step whose end triggers the next allocation (-1: none) — the same in every layer;
* ``proxy_sum`` / ``gradnorm_sum``: the proxy (and its gradient-norm fallback) summed over the window;
* ``proxy_last``: the score the latest allocation used (0 before the first: whether there is a score
  is ``state[N_ALLOC] > 0``, so no NaN sentinel is stored);
* ``hist_step`` / ``hist_proxy`` / ``hist_flags``: ring buffer of the last ``history_size``
  allocations (flags: bit 0 on, bit 1 gradient-norm fallback used, bit 2 the proxy's scores were all zero).

Every saved value is finite (checkpoint scanners and PEFT's state-dict comparisons rely on it): scores
are stored through :func:`finite_score`, and a checkpoint of an older version whose ``proxy_last`` held
NaN is cleaned when it is loaded (``HeteroLoraModel._remap_adapter_state_dict_for_load``).

(No buffer name may end in ``score`` or ``classifier``: PEFT would take it for a task head to save.)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge

from ...runtime.distributed import distributed_active
from ..gated.layer import GatedLinear, GatedLoraLayer

STATE_LEN = 4
STEP, N_ALLOC, N_SCORED, NEXT_ALLOC = range(STATE_LEN)
FLAG_ON, FLAG_FALLBACK, FLAG_ALL_ZERO = 1, 2, 4
# Buffers holding proxy scores; they are kept finite (see finite_score).
SCORE_KINDS = ("proxy_sum", "gradnorm_sum", "proxy_last", "hist_proxy")
DELTA_SCALE_ATTR = "_hetero_output_scale"  # {adapter: a/10}: scales ΔW x only
LAYER_SCALE_ATTR = "_hetero_layer_scale"  # {adapter: a/10}: scales the whole layer output W0 x + b + ΔW x
WEIGHT_GRAD_ATTR = "_hetero_weight_grad"  # {adapter: None | Σ g xᵀ}: filled during a weight_grad_norm pass


def finite_score(values: torch.Tensor) -> torch.Tensor:
    """Scores as stored: NaN → 0 (every proxy is ≥ 0, so NaN ranks with the lowest), ±inf → ±largest float."""
    return torch.nan_to_num(values, nan=0.0)


class HeteroLoraLayer(GatedLoraLayer):
    prefix = "hetlr_"
    extra_buffer_kinds = ("state", "proxy_sum", "gradnorm_sum", "proxy_last", "hist_step", "hist_proxy", "hist_flags")
    kind = "lora"

    def init_extra_buffers(self, adapter_name: str, config) -> None:
        h = config.history_size
        self._store("state")[adapter_name] = torch.tensor([0, 0, 0, -1], dtype=torch.long)
        self._store("proxy_sum")[adapter_name] = torch.zeros(())
        self._store("gradnorm_sum")[adapter_name] = torch.zeros(())
        self._store("proxy_last")[adapter_name] = torch.zeros(())  # meaningful once state[N_ALLOC] > 0
        self._store("hist_step")[adapter_name] = torch.full((h,), -1, dtype=torch.long)
        self._store("hist_proxy")[adapter_name] = torch.zeros(h)
        self._store("hist_flags")[adapter_name] = torch.zeros(h, dtype=torch.long)

    @torch.no_grad()
    def set_on(self, adapter_name: str, on: bool) -> None:
        self._store("module_on")[adapter_name].fill_(1.0 if on else 0.0)

    def adapter_add(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.__dict__.get(DELTA_SCALE_ATTR, {}) or WEIGHT_GRAD_ATTR in self.__dict__:
            return result + self.adapter_update(x, adapter_name).to(result.dtype)  # a proxy scales or observes it
        return super().adapter_add(result, x, adapter_name)

    def adapter_update(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        out = super().adapter_update(x, adapter_name)
        # alpha_test_delta (and alpha_test on a shortcut) scales ΔW x by a/10 (transient, never saved)
        scale = self.__dict__.get(DELTA_SCALE_ATTR, {}).get(adapter_name)
        if scale is not None:
            out = out * scale
        sink = self.__dict__.get(WEIGHT_GRAD_ATTR)
        if sink is not None and adapter_name in sink and out.requires_grad:
            # weight_grad_norm: Σ g xᵀ over tokens, the gradient of a full-rank update here (A and B do not enter)
            xs = x.detach().reshape(-1, x.shape[-1]).float()

            def collect(g: torch.Tensor) -> None:
                term = g.detach().reshape(-1, g.shape[-1]).float().T @ xs
                sink[adapter_name] = term if sink[adapter_name] is None else sink[adapter_name] + term

            out.register_hook(collect)
        return out

    def _unused_tie(self) -> Optional[torch.Tensor]:
        """Zero contribution of switched-off adapters under torch.distributed (see module docstring)."""
        if not (self.training and torch.is_grad_enabled() and distributed_active()) or self.disable_adapters:
            return None
        tie = None
        for adapter in self.active_adapters:
            if adapter in self._store("A") and not self.is_on(adapter):
                a, b = self._store("A")[adapter], self._store("B")[adapter]
                if a.requires_grad or b.requires_grad:
                    term = (a.reshape(-1)[0] + b.reshape(-1)[0]) * 0.0
                    tie = term if tie is None else tie + term
        return tie


class HeteroLoraLinear(GatedLinear, HeteroLoraLayer):
    """HeteroLoRA module candidate around ``nn.Linear`` / ``Conv1D``."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = super().forward(x, *args, **kwargs)
        scales = self.__dict__.get(LAYER_SCALE_ATTR)
        if scales:  # the authors' alpha test of a LoRA candidate: (W0 x + b + ΔW x) · a/10
            for scale in scales.values():
                result = result * scale
        if self.merged:
            return result
        tie = self._unused_tie()
        return result if tie is None else result + tie.to(result.dtype)


class HeteroShortcut(nn.Module, HeteroLoraLayer):
    """A LoRA-adapted shortcut: ``ΔS h`` with ``ΔS = s · B A`` (A Kaiming, B = 0: starts as a no-op).

    The frozen square map of the paper is the identity for ``residual_*`` (the block's own residual
    connection already adds ``h``, so ``(I + ΔS) h`` is the residual plus ``ΔS h``) and zero for
    ``shortcut_*``; neither needs storing. The module lives as a child of its transformer block and
    is applied by forward hooks (``shortcuts.py``). It is not a wrapper of a base layer: there is no
    weight to merge ``ΔS`` into, see :meth:`merge`.
    """

    def __init__(self, hidden_size: int, kind: str, adapter_name: str, config, active_adapters, device,
                 r: int, lora_alpha: float) -> None:
        nn.Module.__init__(self)
        self._init_adapter_containers()
        self.kwargs = {}
        self.in_features = self.out_features = hidden_size
        self.fan_in_fan_out = False
        self.kind = kind
        self._device = device
        self._active_adapter = list(active_adapters) if active_adapters else adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha)

    # A shortcut wraps no base layer: make PEFT's generic accessors fail cleanly instead of recursing.
    @property
    def weight(self):
        raise AttributeError("a HeteroLoRA shortcut has no base weight")

    @property
    def bias(self):
        raise AttributeError("a HeteroLoRA shortcut has no base bias")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        target = device if device is not None else self._device
        if target is None or target == torch.device("meta"):
            return
        for name in self.adapter_layer_names + self.other_param_names:
            store = getattr(self, name, None)
            if isinstance(store, (nn.ParameterDict, BufferDict)) and adapter_name in store:
                value = store[adapter_name]
                if value.device != torch.device("meta"):
                    moved = value.to(target)
                    store[adapter_name] = nn.Parameter(moved, requires_grad=value.requires_grad) \
                        if isinstance(store, nn.ParameterDict) else moved
            elif isinstance(store, nn.ModuleDict) and adapter_name in store:
                store[adapter_name].to(target)

    def delta(self, h: torch.Tensor) -> Optional[torch.Tensor]:
        """``Σ ΔS h`` over the active switched-on adapters (None when nothing contributes)."""
        if self.disable_adapters:
            return None
        out = None
        for adapter in self.active_adapters:
            if adapter in self._store("A") and self.is_on(adapter):
                d = self.adapter_update(h, adapter)
                out = d if out is None else out + d
        tie = self._unused_tie()
        if tie is not None:
            out = tie.to(h.dtype) if out is None else out + tie
        return None if out is None else out.to(h.dtype)

    # ----- merging and export: impossible for a switched-on shortcut -----------------------------
    def _refuse_if_on(self, adapter_names, what: str) -> None:
        for adapter in adapter_names:
            if adapter in self._store("A") and self.is_on(adapter):
                raise ValueError(
                    f"HeteroLoRA shortcut {self.kind!r} of adapter {adapter!r} is switched on and cannot be {what}: "
                    "it adds a linear map of a hidden state to a different point of the block (for residual_* the "
                    "residual path, which has no weight), so no base weight can absorb it. Keep the PEFT model, or "
                    "train without shortcuts / with them switched off."
                )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._refuse_if_on(check_adapters_to_merge(self, adapter_names), "merged into the base weights")

    def unmerge(self) -> None:
        """Nothing was merged (switched-off shortcuts contribute nothing)."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError("a HeteroLoRA shortcut has no base weight to add a delta to")

    def export_factors(self, adapter_name: str):
        """Switched off: omitted from a LoRA export (None). Switched on: a LoRA export cannot hold it."""
        self._refuse_if_on([adapter_name], "exported as a plain LoRA adapter")
        return None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``ΔS h`` (zeros when off); the model itself uses :meth:`delta` through hooks."""
        d = self.delta(h)
        return torch.zeros_like(h) if d is None else d

    def __repr__(self) -> str:
        return f"hetlr.HeteroShortcut(kind={self.kind!r}, hidden={self.in_features})"
