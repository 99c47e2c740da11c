"""Fields every method's config shares: the ones PEFT itself reads directly.

PEFT's injection code reads ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``layers_pattern``, ``modules_to_save``, ``bias``, ``target_parameters`` and
``trainable_token_indices`` from any config; keeping them in one dataclass keeps the methods
consistent with each other and with LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import TaskType

from .config_checks import check_shared_fields
from .checks import check_choice, check_real


@dataclass
class LowRankPeftConfig(PeftConfig):
    """Common PEFT targeting fields; method configs subclass this."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffix match) or a regex of full names to adapt; None uses PEFT's LoRA defaults."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to leave untouched."}
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for layers storing weight as (in, out), e.g. GPT-2's Conv1D (set automatically)."}
    )
    bias: str = field(
        default="none",
        metadata={"help": "Base-model biases to train, as in LoRA: 'none', 'all' (every bias of the model) or "
                          "'lora_only' (the biases of the adapted layers). Saved with the adapter."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved, e.g. a classifier head."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer ModuleList, used with layers_to_transform."}
    )
    target_parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Not supported by these methods; must stay None."}
    )
    trainable_token_indices: Optional[Union[list[int], dict[str, list[int]]]] = field(
        default=None, metadata={"help": "Token indices whose embeddings are trained (PEFT's trainable tokens)."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True starts the adapter as a no-op (the adapted model equals the base model)."},
    )

    def __post_init__(self):
        # Checked before PEFT's own check, whose message does not name the field.
        if self.task_type is not None:
            check_choice(type(self).__name__, "task_type", self.task_type, [t.value for t in TaskType])
        super().__post_init__()

    def _check_lora_fields(self, owner: str) -> None:
        """Targeting plus the ``lora_alpha`` / ``lora_dropout`` every method config declares."""
        self._check_targeting(owner)
        check_real(owner, "lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_real(owner, "lora_dropout", self.lora_dropout, low=0.0, high=1.0, high_open=True)

    def _check_targeting(self, owner: str) -> None:
        check_shared_fields(self, owner)
        if self.target_parameters:
            raise ValueError(
                f"{owner}.target_parameters={self.target_parameters!r} is not allowed; it must be None "
                "(these methods adapt nn.Linear and Conv1D modules chosen by target_modules)."
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"{owner}.layers_to_transform={self.layers_to_transform!r} is not allowed when target_modules is a "
                "regex string; it must be None."
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(
                f"{owner}.layers_pattern={self.layers_pattern!r} is not allowed when target_modules is a regex "
                "string; it must be None."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(
                f"{owner}.layers_to_transform=None is not allowed when layers_pattern is set; give the layer indices."
            )
