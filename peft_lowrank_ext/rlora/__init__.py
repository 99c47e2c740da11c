"""RLoRA: randomized Walsh–Hadamard (Fastfood) LoRA with a PAC-Bayes regularizer."""

from ..registry import ensure_peft_type

ensure_peft_type("rlora")  # the config's __post_init__ refers to PeftType.RLORA

from .config import RLoraConfig  # noqa: E402
from .layer import RLoraLayer, RLoraLinear  # noqa: E402
from .model import RLoraModel  # noqa: E402
from .pac_bayes import pac_bayes_stats, pac_bayes_terms  # noqa: E402

__all__ = ["RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "pac_bayes_stats", "pac_bayes_terms"]
