"""AutoLoRA tuner: the shared gated layer plus the bi-level search step."""

from __future__ import annotations

from torch import nn

from ..gated.model import GatedTuner
from ...runtime.step_hooks import register_step_callbacks
from .config import AutoLoraConfig
from .layer import AutoLoraLayer, AutoLoraLinear
from .search import capture_train_batch, search_step

_CAPTURE_ATTR = "_autolora_capture_handle"


class AutoLoraModel(GatedTuner):
    """Creates an AutoLoRA model (use via ``get_peft_model``).

    Zhang, Qiang, Somayajula, Xie. AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank
    Adaptation Based on Meta Learning. NAACL 2024, pp. 5048–5060.
    """

    prefix: str = "autolr_"
    method_name = "AutoLoRA"
    tuner_layer_cls = AutoLoraLayer
    linear_cls = AutoLoraLinear

    def combined_config(self, config: AutoLoraConfig, rank: int, shortcut_rank: int, target_modules: list[str]):
        """A combination has fixed ranks: it is created in the selected phase (β is not searched)."""
        combined = super().combined_config(config, rank, shortcut_rank, target_modules)
        combined.phase = "selected"
        return combined

    def _post_injection_hook(self, model: nn.Module, config: AutoLoraConfig, adapter_name: str) -> None:
        register_step_callbacks(model, "autolora_search", pre=search_step, reads_whole_tensors=False)
        if getattr(model, _CAPTURE_ATTR, None) is None:
            handle = model.register_forward_pre_hook(capture_train_batch, with_kwargs=True)
            object.__setattr__(model, _CAPTURE_ATTR, handle)
