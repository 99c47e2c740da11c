"""AutoLoRA layer: the shared gated layer with ``soft_gate = softmax(β)``.

β and its Adam moments are persistent buffers, not parameters: the user's optimizer never sees
them (β is learned by the bi-level step in ``search.py``), and they are saved with the adapter
and in every checkpoint, so a resumed search continues with identical β and β-optimizer state.
"""

from __future__ import annotations

import torch

from ..gated.layer import GatedLinear, GatedLoraLayer


def selection_scores(beta: torch.Tensor, rule: str, where: str) -> torch.Tensor:
    """The per-component scores thresholded at selection.

    ``"softmax"``: ``softmax(β)`` (the authors' ``lora_glue.py:186``). ``"normalized"``: ``β / Σβ`` on
    raw β, which starts at ones (the authors' ``run_glue_search.py:98-99``; with threshold 1/r this is
    ``β_j ≥ mean β``); ``Σβ ≤ 0`` makes it meaningless, so it raises naming ``where``.
    """
    beta = beta.detach().float()
    if rule == "softmax":
        return torch.softmax(beta, dim=0)
    if rule == "normalized":
        total = float(beta.sum())
        if not total > 0:
            raise ValueError(f"AutoLoRA {where}: selection_rule='normalized' needs Σβ > 0, but Σβ = {total!r}; "
                             "use selection_rule='softmax' for this adapter")
        return beta / total
    raise ValueError(f"selection_rule={rule!r} is not allowed; selection_rule must be one of 'softmax', 'normalized'")


def kept_mask(beta: torch.Tensor, threshold: float, rule: str, where: str) -> torch.Tensor:
    """0/1 mask of components whose score (``selection_scores``) is ≥ threshold; at least the largest is kept."""
    scores = selection_scores(beta, rule, where)
    keep = (scores >= threshold).float()
    if keep.sum() == 0:
        keep[scores.argmax()] = 1.0
    return keep


class AutoLoraLayer(GatedLoraLayer):
    prefix = "autolr_"
    extra_buffer_kinds = ("beta", "beta_exp_avg", "beta_exp_avg_sq", "beta_step")

    def init_extra_buffers(self, adapter_name: str, config) -> None:
        r = self._store("r")[adapter_name]
        # Ones, not zeros: softmax is shift-invariant (same α, same ∇β, same Adam steps), and the
        # "normalized" selection rule is the authors' β / Σβ on β initialised to ones.
        self._store("beta")[adapter_name] = torch.ones(r)
        self._store("beta_exp_avg")[adapter_name] = torch.zeros(r)
        self._store("beta_exp_avg_sq")[adapter_name] = torch.zeros(r)
        self._store("beta_step")[adapter_name] = torch.zeros(())

    def soft_gate(self, adapter_name: str) -> torch.Tensor:
        """α = softmax(β) over the module's r components."""
        return torch.softmax(self._store("beta")[adapter_name], dim=0)

    def alpha(self, adapter_name: str) -> torch.Tensor:
        with torch.no_grad():
            return self.soft_gate(adapter_name).detach().clone()

    def kept_components(self, adapter_name: str, threshold: float, module_name: str | None = None) -> torch.Tensor:
        """0/1 mask of components whose score is ≥ threshold, the score being the config's
        ``selection_rule``: softmax(β)_j or β_j / Σβ; at least the largest one is kept."""
        rule = self._store("config")[adapter_name].selection_rule
        where = f"module {module_name or type(self.get_base_layer()).__name__!r} (adapter {adapter_name!r})"
        return kept_mask(self._store("beta")[adapter_name], threshold, rule, where)

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
