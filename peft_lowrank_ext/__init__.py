"""Low-rank adaptation methods for Hugging Face PEFT: importing this package registers them.

After ``import peft_lowrank_ext``, ``get_peft_model(model, RLoraConfig(...))``, ``save_pretrained``,
``PeftModel.from_pretrained``, ``AutoPeftModel*`` and transformers' ``load_adapter`` work as for LoRA.
"""

from .tuners.rlora import RLoraConfig, RLoraModel, pac_bayes_stats
from .tuners.autolora import (
    AutoLoraConfig,
    AutoLoraModel,
    AutoLoraSearch,
    autolora_ranks,
    autolora_select,
    retrain_lora_config,
    run_autolora,
)
from .tuners.prilora import (PriLoraConfig, PriLoraModel, PriLoraScheduleCallback, prilora_ranks, prilora_sparsity,
                             prilora_step, set_prilora_total_steps)
from .tuners.heterolora import (HeteroLoraConfig, HeteroLoraData, HeteroLoraModel, heterolora_allocation,
                                heterolora_score)

from .export import export_lora
from .runtime.integrity import CorruptFileError, verify_adapter_folder, verify_checkpoint
from .runtime.integrity import install as _install_integrity_checks

_install_integrity_checks()

__version__ = "0.1.0"

__all__ = [
    "RLoraConfig", "RLoraModel", "pac_bayes_stats",
    "AutoLoraConfig", "AutoLoraModel", "AutoLoraSearch", "autolora_ranks", "autolora_select",
    "retrain_lora_config", "run_autolora",
    "PriLoraConfig", "PriLoraModel", "PriLoraScheduleCallback", "prilora_ranks", "prilora_sparsity", "prilora_step",
    "set_prilora_total_steps",
    "HeteroLoraConfig", "HeteroLoraData", "HeteroLoraModel", "heterolora_allocation", "heterolora_score",
    "export_lora", "CorruptFileError", "verify_adapter_folder", "verify_checkpoint", "__version__",
]
