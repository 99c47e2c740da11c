"""AutoLoRA: meta-learned selection variables per rank-1 component."""

from .._base.registry import register_method

from .config import AutoLoraConfig
from .layer import AutoLoraLayer, AutoLoraLinear
from .model import AutoLoraModel
from .search import AutoLoraSearch
from .selection import autolora_ranks, autolora_select, retrain_lora_config, run_autolora

__all__ = ["AutoLoraConfig", "AutoLoraLayer", "AutoLoraLinear", "AutoLoraModel", "AutoLoraSearch",
           "autolora_ranks", "autolora_select", "retrain_lora_config", "run_autolora"]

register_method("autolora", AutoLoraConfig, AutoLoraModel)
