"""Low-rank adaptation methods for Hugging Face PEFT: importing this package registers them.

After ``import peft_lowrank_ext``, ``get_peft_model(model, RLoraConfig(...))``, ``save_pretrained``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work as for LoRA.
"""

from .registry import register_method
from .rlora import RLoraConfig, RLoraModel, pac_bayes_stats
from .autolora import (
    AutoLoraConfig,
    AutoLoraModel,
    AutoLoraSearch,
    autolora_ranks,
    autolora_select,
    retrain_lora_config,
    run_autolora,
)
from .prilora import PriLoraConfig, PriLoraModel, prilora_ranks, prilora_sparsity, prilora_step
from .heterolora import HeteroLoraConfig, HeteroLoraModel, heterolora_allocation, heterolora_score

register_method("rlora", RLoraConfig, RLoraModel)
register_method("autolora", AutoLoraConfig, AutoLoraModel)
register_method("prilora", PriLoraConfig, PriLoraModel)
register_method("heterolora", HeteroLoraConfig, HeteroLoraModel)

from .export import export_lora  # noqa: E402
from .integrity import CorruptFileError, verify_adapter_folder, verify_checkpoint  # noqa: E402
from .integrity import install as _install_integrity_checks  # noqa: E402

_install_integrity_checks()

__version__ = "0.1.0"

__all__ = [
    "RLoraConfig", "RLoraModel", "pac_bayes_stats",
    "AutoLoraConfig", "AutoLoraModel", "AutoLoraSearch", "autolora_ranks", "autolora_select",
    "retrain_lora_config", "run_autolora",
    "PriLoraConfig", "PriLoraModel", "prilora_ranks", "prilora_sparsity", "prilora_step",
    "HeteroLoraConfig", "HeteroLoraModel", "heterolora_allocation", "heterolora_score",
    "export_lora", "CorruptFileError", "verify_adapter_folder", "verify_checkpoint", "__version__",
]
