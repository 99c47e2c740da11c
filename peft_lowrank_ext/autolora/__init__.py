"""AutoLoRA: meta-learned selection variables per rank-1 component."""

from ..registry import ensure_peft_type

ensure_peft_type("autolora")

from .config import AutoLoraConfig  # noqa: E402
from .layer import AutoLoraLayer, AutoLoraLinear  # noqa: E402
from .model import AutoLoraModel  # noqa: E402
from .search import AutoLoraSearch  # noqa: E402
from .selection import autolora_ranks, autolora_select, retrain_lora_config, run_autolora  # noqa: E402

__all__ = ["AutoLoraConfig", "AutoLoraLayer", "AutoLoraLinear", "AutoLoraModel", "AutoLoraSearch",
           "autolora_ranks", "autolora_select", "retrain_lora_config", "run_autolora"]
