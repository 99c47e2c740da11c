"""PRILoRA layer: the shared gated layer with an element mask on ``A`` and input statistics.

Per adapter it keeps two extra persistent buffers, saved with the adapter and in every checkpoint
so that a resumed run reproduces statistics, masks and schedule exactly:

* ``in_sq_ema`` ``(d_in,)``: ``n_j``, the EMA of ``mean_tokens(x_j²)``, updated once per optimizer step;
* ``step`` ``()`` (int64): optimizer steps completed, the position in the pruning schedule.

Statistics are collected during the ordinary forward pass (no second pass, no autograd graph),
only in training mode with gradients enabled, as a pending ``(Σ_tokens x², tokens)`` per adapter
that the post-step callback folds into the EMA. Folding once per optimizer step (not per forward)
makes gradient accumulation count as one step, and makes a non-reentrant gradient-checkpointing
recompute (which sees the same inputs again) leave the average unchanged. The pending sums are
plain attributes, not buffers: they are empty whenever a checkpoint is written after a step, and
DDP's buffer broadcast (``broadcast_buffers=True``) must not overwrite one replica's sums with
another's in the middle of gradient accumulation.

Padding tokens are left out [ours]: a forward pre-hook on the adapted model keeps its ``attention_mask``
(``TokenMask``), and a layer whose input has that mask's ``[batch, seq]`` leading dims weights its token
rows by it (other inputs, e.g. packed or 2-D ones, count every row). The mask of the latest training
forward stays available during backward, so a gradient-checkpointing recompute excludes padding too.

Masked entries of ``A`` contribute exactly nothing: the masked kernel multiplies ``A`` by the mask
in the forward pass and the gradient of ``A`` by the mask in the backward pass; merge and export
do the same. ``A``'s stored values under the mask are left as they are (so that with ``regrow`` an
entry that comes back competes, and resumes, with its last value).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ...runtime.distributed import fsdp_kind, is_sharded
from ..gated.layer import GatedLinear, GatedLoraLayer
from .pruning import prune_mask, scheduled_sparsity


class TokenMask:
    """The attention mask of the adapted model's latest training forward, shared by its PRILoRA layers.

    Why: padded positions are not data; counting them would pull the input statistics towards the padding
    embedding. Held per model (not globally), so the layers of two models never see each other's mask.
    """

    def __init__(self, root: nn.Module):
        self.weights = None  # (batch·seq,) fp32 0/1, or None: count every row
        self.shape = None  # the mask's (batch, seq)
        self.count = None  # 0-dim tensor: tokens kept (no device sync)
        self.depth = 0  # > 0 while the model's forward runs
        try:
            names = list(inspect.signature(root.forward).parameters)
        except (TypeError, ValueError):
            names = []
        self.position = names.index("attention_mask") if "attention_mask" in names else None

    def pre_forward(self, module: nn.Module, args, kwargs) -> None:
        self.depth += 1
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation forwards gather nothing: keep the training mask for a pending backward
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        if torch.is_tensor(mask) and mask.dim() == 2:
            self.weights = (mask.detach() != 0).reshape(-1).float()
            self.shape = tuple(mask.shape)
            self.count = self.weights.sum()
        else:
            self.weights = self.shape = self.count = None

    def post_forward(self, *args) -> None:
        self.depth = max(0, self.depth - 1)

    def rows_for(self, x: torch.Tensor):
        """``(weights, count)`` for the token rows of ``x``, or ``None`` when every row counts."""
        if self.weights is None or tuple(x.shape[:-1]) != self.shape:
            return None
        if self.depth == 0 and torch._C._current_graph_task_id() == -1:
            return None  # called outside the model's forward and outside a backward recompute
        return self.weights, self.count


_MASK_ATTR = "_prilora_token_mask"


def install_token_mask(root: nn.Module) -> TokenMask:
    """The model's ``TokenMask``, with its forward hooks registered once."""
    holder = root.__dict__.get(_MASK_ATTR)
    if holder is None:
        holder = TokenMask(root)
        root.register_forward_pre_hook(holder.pre_forward, with_kwargs=True)
        root.register_forward_hook(holder.post_forward, always_call=True)
        object.__setattr__(root, _MASK_ATTR, holder)
    return holder


class PriLoraLayer(GatedLoraLayer):
    prefix = "prilr_"
    extra_buffer_kinds = ("in_sq_ema", "step")

    def init_extra_buffers(self, adapter_name: str, config) -> None:
        self._store("in_sq_ema")[adapter_name] = torch.zeros(self.in_features)
        self._store("step")[adapter_name] = torch.zeros((), dtype=torch.long)

    def training_adapters(self) -> list[str]:
        """Active adapters of this layer that are being trained (their statistics and schedule advance)."""
        if self.disable_adapters:
            return []
        a_store = self._store("A")  # PRILoRA never switches a module off, so no (device-syncing) module_on check
        return [a for a in self.active_adapters if a in a_store and a_store[a].requires_grad]

    def pending_statistics(self) -> dict[str, list]:
        """``{adapter: [Σ_tokens x² (d_in,) fp32, tokens]}`` gathered since the last optimizer step."""
        pending = self.__dict__.get("_prilora_pending")
        if pending is None:
            pending = self.__dict__["_prilora_pending"] = {}
        return pending

    def observe_input(self, x: torch.Tensor) -> None:
        """Add ``Σ_tokens x_j²`` and the token count to the pending statistics (training mode only)."""
        if not (self.training and torch.is_grad_enabled()):
            return
        adapters = self.training_adapters()
        if not adapters:
            return
        with torch.no_grad():
            flat = x.detach().reshape(-1, x.shape[-1]).float()  # fp32 accumulation even for half inputs
            holder = self.__dict__.get(_MASK_ATTR)
            rows = holder.rows_for(x) if holder is not None else None
            if rows is None:
                sq = (flat * flat).sum(0)  # one elementwise pass; far faster on CPU than vector_norm over dims
                tokens = flat.shape[0]
            else:  # padding rows weigh 0: exactly the sums over the real tokens, without a device sync
                weights, tokens = rows
                sq = (flat * flat * weights.to(flat.device)[:, None]).sum(0)
            pending = self.pending_statistics()
            for adapter in adapters:
                entry = pending.get(adapter)
                if entry is None:
                    pending[adapter] = [sq.clone(), tokens]
                else:
                    entry[0].add_(sq)
                    entry[1] = entry[1] + tokens

    @torch.no_grad()
    def commit_statistics(self, adapter_name: str, beta: float) -> None:
        """``n ← β n + (1−β) Σx²/tokens`` if tokens were seen since the last step; then clear the pending sums."""
        entry = self.pending_statistics().pop(adapter_name, None)
        if entry is None:
            return
        ema = self._store("in_sq_ema")[adapter_name]
        if torch.is_tensor(entry[1]):  # token count from an attention mask: no device sync
            tokens = entry[1].to(ema.device, torch.float32)
            mean = entry[0].to(ema.device) / tokens.clamp_min(1.0)
            ema.copy_(torch.where(tokens > 0, ema * beta + mean * (1.0 - beta), ema))
            return
        if entry[1] == 0:
            return
        ema.mul_(beta).add_(entry[0].to(ema.device) / entry[1], alpha=1.0 - beta)

    @torch.no_grad()
    def prune(self, adapter_name: str, step: int | None = None, sparsity: float | None = None) -> None:
        """Set the element mask to ``sparsity`` (default: the scheduled sparsity of ``step``, by default this
        adapter's step)."""
        config = self._store("config")[adapter_name]
        step = int(self._store("step")[adapter_name]) if step is None else step
        if sparsity is None:
            sparsity = scheduled_sparsity(config, step, self.__dict__.get("_prilora_total_steps"))
        mask = self._store("element_mask")[adapter_name]
        lora_a = self._store("A")[adapter_name]
        if is_sharded(lora_a):  # FSDP2 shard (DTensor): decide on the whole A, the same on every rank
            lora_a = lora_a.full_tensor()
        elif lora_a.shape != mask.shape:  # FSDP1 outside forward and outside summon_full_params: a flat slice
            raise RuntimeError(
                f"PRILoRA pruning under {fsdp_kind(lora_a)} outside FullyShardedDataParallel.summon_full_params: each "
                "rank holds a flat slice of A, not its rows. Prune through prilora_post_step (it gathers A)."
            )
        new = prune_mask(lora_a, self._store("in_sq_ema")[adapter_name], mask,
                         sparsity, config.regrow)
        mask.copy_(new)

    def sparsity(self, adapter_name: str) -> float:
        """Fraction of ``A``'s entries currently masked."""
        mask = self._store("element_mask")[adapter_name]
        return float((mask == 0).sum()) / mask.numel()


class PriLoraLinear(GatedLinear, PriLoraLayer):
    """PRILoRA around ``nn.Linear`` / ``Conv1D``."""

    def before_adapter_forward(self, x: torch.Tensor) -> None:
        self.observe_input(x)

    def set_token_mask(self, holder: TokenMask) -> None:
        """Weight this layer's statistics by the adapted model's attention mask (see ``TokenMask``)."""
        self.__dict__[_MASK_ATTR] = holder
