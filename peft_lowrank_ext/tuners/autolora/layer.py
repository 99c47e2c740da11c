"""AutoLoRA layer: the shared gated layer with ``soft_gate = softmax(β)``.

β and its Adam moments are persistent buffers, not parameters: the user's optimizer never sees
them (β is learned by the bi-level step in ``search.py``), and they are saved with the adapter
and in every checkpoint, so a resumed search continues with identical β and β-optimizer state.
"""

from __future__ import annotations

import torch

from ..gated.layer import GatedLinear, GatedLoraLayer


class AutoLoraLayer(GatedLoraLayer):
    prefix = "autolr_"
    extra_buffer_kinds = ("beta", "beta_exp_avg", "beta_exp_avg_sq", "beta_step")

    def init_extra_buffers(self, adapter_name: str, config) -> None:
        r = self._store("r")[adapter_name]
        self._store("beta")[adapter_name] = torch.zeros(r)
        self._store("beta_exp_avg")[adapter_name] = torch.zeros(r)
        self._store("beta_exp_avg_sq")[adapter_name] = torch.zeros(r)
        self._store("beta_step")[adapter_name] = torch.zeros(())

    def soft_gate(self, adapter_name: str) -> torch.Tensor:
        """α = softmax(β) over the module's r components."""
        return torch.softmax(self._store("beta")[adapter_name], dim=0)

    def alpha(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.soft_gate(adapter_name).detach().clone()

    def kept_components(self, adapter_name: str, threshold: float) -> torch.Tensor:
        """0/1 mask of components with α_j ≥ threshold; at least the largest one is kept."""
        alpha = self.alpha(adapter_name)
        keep = (alpha >= threshold).float()
        if keep.sum() == 0:
            keep[alpha.argmax()] = 1.0
        return keep

    def effective_rank(self, adapter_name: str) -> int:
        """During the search, what thresholding would keep now (``#{j : α_j ≥ threshold}``, at least 1)
        rather than the ``r`` components that are all still active; after selection the kept ranks."""
        rank = super().effective_rank(adapter_name)
        config = self._store("config")[adapter_name]
        if rank and config.phase == "search":
            return int(self.kept_components(adapter_name, config.effective_threshold).sum())
        return rank


class AutoLoraLinear(GatedLinear, AutoLoraLayer):
    """AutoLoRA around ``nn.Linear`` / ``Conv1D``."""
