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

Masked entries of ``A`` contribute exactly nothing: the masked kernel multiplies ``A`` by the mask
in the forward pass and the gradient of ``A`` by the mask in the backward pass; merge and export
do the same. ``A``'s stored values under the mask are left as they are (so that with ``regrow`` an
entry that comes back competes, and resumes, with its last value).
"""

from __future__ import annotations

import torch

from ...runtime.distributed import fsdp_kind, is_sharded
from ..gated.layer import GatedLinear, GatedLoraLayer
from .pruning import prune_mask, scheduled_sparsity


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
            sq = (flat * flat).sum(0)  # one elementwise pass; far faster on CPU than vector_norm over dims
            tokens = flat.shape[0]
            pending = self.pending_statistics()
            for adapter in adapters:
                entry = pending.get(adapter)
                if entry is None:
                    pending[adapter] = [sq.clone(), tokens]
                else:
                    entry[0].add_(sq)
                    entry[1] += tokens

    @torch.no_grad()
    def commit_statistics(self, adapter_name: str, beta: float) -> None:
        """``n ← β n + (1−β) Σx²/tokens`` if tokens were seen since the last step; then clear the pending sums."""
        entry = self.pending_statistics().pop(adapter_name, None)
        if entry is None or entry[1] == 0:
            return
        ema = self._store("in_sq_ema")[adapter_name]
        ema.mul_(beta).add_(entry[0].to(ema.device) / entry[1], alpha=1.0 - beta)

    @torch.no_grad()
    def prune(self, adapter_name: str, step: int | None = None) -> None:
        """Set the element mask to the scheduled sparsity of ``step`` (default: this adapter's step)."""
        config = self._store("config")[adapter_name]
        step = int(self._store("step")[adapter_name]) if step is None else step
        mask = self._store("element_mask")[adapter_name]
        lora_a = self._store("A")[adapter_name]
        if is_sharded(lora_a):  # FSDP2 shard (DTensor): decide on the whole A, the same on every rank
            lora_a = lora_a.full_tensor()
        elif fsdp_kind(lora_a) is not None:
            raise RuntimeError(
                f"PRILoRA pruning under {fsdp_kind(lora_a)} is not supported: outside forward each rank holds a "
                "flat slice of A, not its rows. Use DistributedDataParallel or FSDP2 (fully_shard)."
            )
        new = prune_mask(lora_a, self._store("in_sq_ema")[adapter_name], mask,
                         scheduled_sparsity(config, step), config.regrow)
        mask.copy_(new)

    def sparsity(self, adapter_name: str) -> float:
        """Fraction of ``A``'s entries currently masked."""
        mask = self._store("element_mask")[adapter_name]
        return float((mask == 0).sum()) / mask.numel()


class PriLoraLinear(GatedLinear, PriLoraLayer):
    """PRILoRA around ``nn.Linear`` / ``Conv1D``."""

    def before_adapter_forward(self, x: torch.Tensor) -> None:
        self.observe_input(x)
