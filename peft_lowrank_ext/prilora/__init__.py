"""PRILoRA: ranks that grow linearly with depth plus ongoing pruning of A."""

from ..registry import ensure_peft_type

ensure_peft_type("prilora")

from .config import PriLoraConfig  # noqa: E402
from .depth import DEFAULT_BLOCK_PATTERN, block_position, linear_rank, linear_ranks  # noqa: E402
from .layer import PriLoraLayer, PriLoraLinear  # noqa: E402
from .model import PriLoraModel, prilora_post_step, prilora_ranks, prilora_sparsity, prilora_step  # noqa: E402
from .pruning import importance, prune_mask, scheduled_sparsity  # noqa: E402

__all__ = ["PriLoraConfig", "PriLoraLayer", "PriLoraLinear", "PriLoraModel", "DEFAULT_BLOCK_PATTERN",
           "block_position", "linear_rank", "linear_ranks", "importance", "prune_mask", "scheduled_sparsity",
           "prilora_post_step", "prilora_ranks", "prilora_sparsity", "prilora_step"]
