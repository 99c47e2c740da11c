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


class AutoLoraLinear(GatedLinear, AutoLoraLayer):
    """AutoLoRA around ``nn.Linear`` / ``Conv1D``."""
