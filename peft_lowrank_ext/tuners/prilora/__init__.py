"""PRILoRA: ranks that grow linearly with depth plus ongoing pruning of A."""

from .._base.registry import register_method

from .config import PriLoraConfig
from .depth import DEFAULT_BLOCK_PATTERN, block_position, linear_rank, linear_ranks
from .layer import PriLoraLayer, PriLoraLinear
from .layer import TokenMask
from .model import (PriLoraModel, PriLoraScheduleCallback, prilora_post_step, prilora_ranks, prilora_sparsity,
                    prilora_step, set_prilora_total_steps)
from .pruning import importance, prune_mask, resolve_schedule, scheduled_sparsity

__all__ = ["PriLoraConfig", "PriLoraLayer", "PriLoraLinear", "PriLoraModel", "DEFAULT_BLOCK_PATTERN",
           "block_position", "linear_rank", "linear_ranks", "importance", "prune_mask", "scheduled_sparsity",
           "prilora_post_step", "prilora_ranks", "prilora_sparsity", "prilora_step", "PriLoraScheduleCallback",
           "set_prilora_total_steps", "resolve_schedule", "TokenMask"]

register_method("prilora", PriLoraConfig, PriLoraModel)
