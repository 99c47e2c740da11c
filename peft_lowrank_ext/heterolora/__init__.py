"""HeteroLoRA: zero-cost-proxy allocation of the LoRA budget, with LoRA-adapted shortcuts."""

from ..registry import ensure_peft_type

ensure_peft_type("heterolora")

from .config import HeteroLoraConfig, budget_count  # noqa: E402
from .layer import HeteroLoraLayer, HeteroLoraLinear, HeteroShortcut  # noqa: E402
from .model import HeteroLoraModel  # noqa: E402
from .allocation import heterolora_allocation, heterolora_score  # noqa: E402

__all__ = ["HeteroLoraConfig", "HeteroLoraLayer", "HeteroLoraLinear", "HeteroLoraModel", "HeteroShortcut",
           "budget_count", "heterolora_allocation", "heterolora_score"]
