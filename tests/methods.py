"""The method configs the conformance suite runs over: a later method joins by adding one entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from peft import PeftConfig

from peft_lowrank_ext import RLoraConfig


@dataclass(frozen=True)
class MethodCase:
    name: str
    # (target_modules, task_type, **overrides) -> a config whose adapter is NOT a no-op (so merge tests bite)
    make_config: Callable[..., PeftConfig]
    prefix: str


def _rlora(target_modules, task_type, **overrides):
    kwargs = dict(r=4, lora_alpha=8, projection_ratio=0.25, target_modules=list(target_modules),
                  task_type=task_type, init_weights=False, init_std=0.5, seed=3)
    kwargs.update(overrides)
    return RLoraConfig(**kwargs)


METHODS = {
    "rlora": MethodCase("rlora", _rlora, "rlr_"),
}
