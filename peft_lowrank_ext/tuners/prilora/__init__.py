"""PRILoRA: ranks that grow linearly with depth plus ongoing pruning of A."""

from .._base.registry import register_method

from .config import PriLoraConfig
from .depth import DEFAULT_BLOCK_PATTERN, block_position, linear_rank, linear_ranks
from .layer import PriLoraLayer, PriLoraLinear
from .model import PriLoraModel, prilora_post_step, prilora_ranks, prilora_sparsity, prilora_step
from .pruning import importance, prune_mask, scheduled_sparsity

__all__ = ["PriLoraConfig", "PriLoraLayer", "PriLoraLinear", "PriLoraModel", "DEFAULT_BLOCK_PATTERN",
           "block_position", "linear_rank", "linear_ranks", "importance", "prune_mask", "scheduled_sparsity",
           "prilora_post_step", "prilora_ranks", "prilora_sparsity", "prilora_step"]

register_method("prilora", PriLoraConfig, PriLoraModel)
