"""RLoRA: randomized Walsh–Hadamard (Fastfood) LoRA with a PAC-Bayes regularizer."""

from .._base.registry import register_method

from .config import RLoraConfig, check_projection_size
from .layer import RLoraLayer, RLoraLinear
from .model import RLoraModel
from .pac_bayes import pac_bayes_stats, pac_bayes_terms

__all__ = ["RLoraConfig", "RLoraLayer", "RLoraLinear", "RLoraModel", "check_projection_size", "pac_bayes_stats",
           "pac_bayes_terms"]

register_method("rlora", RLoraConfig, RLoraModel)
