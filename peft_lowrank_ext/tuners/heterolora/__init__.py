"""HeteroLoRA: zero-cost-proxy allocation of the LoRA budget, with LoRA-adapted shortcuts."""

from .._base.registry import register_method

from .config import HeteroLoraConfig, budget_count
from .layer import HeteroLoraLayer, HeteroLoraLinear, HeteroShortcut
from .model import HeteroLoraModel
from .allocation import heterolora_allocation, heterolora_score
from .data import HeteroLoraData

__all__ = ["HeteroLoraConfig", "HeteroLoraData", "HeteroLoraLayer", "HeteroLoraLinear", "HeteroLoraModel", "HeteroShortcut",
           "budget_count", "heterolora_allocation", "heterolora_score"]

register_method("heterolora", HeteroLoraConfig, HeteroLoraModel)
