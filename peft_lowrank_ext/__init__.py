"""Low-rank adaptation methods for Hugging Face PEFT: importing this package registers them.

After ``import peft_lowrank_ext``, ``get_peft_model(model, RLoraConfig(...))``, ``save_pretrained``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work as for LoRA.
"""

from .registry import register_method
from .rlora import RLoraConfig, RLoraModel, pac_bayes_stats

register_method("rlora", RLoraConfig, RLoraModel)

from .export import export_lora  # noqa: E402

__version__ = "0.1.0"

__all__ = ["RLoraConfig", "RLoraModel", "export_lora", "pac_bayes_stats", "__version__"]
