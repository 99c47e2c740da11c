"""The method configs the conformance suite runs over: a later method joins by adding one entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import PeftConfig

from peft_lowrank_ext import AutoLoraConfig, AutoLoraSearch, HeteroLoraConfig, PriLoraConfig, RLoraConfig
from models import VOCAB


@dataclass(frozen=True)
class MethodCase:
    name: str
    # (target_modules, task_type) -> a config whose adapter is NOT a no-op (so merge tests bite)
    make_config: Callable[..., PeftConfig]
    prefix: str
    # () -> extra Trainer callbacks the method needs to train (e.g. AutoLoRA's held-out data)
    trainer_callbacks: Callable[[], list] = field(default=lambda: [])


def _rlora(target_modules, task_type):
    return RLoraConfig(r=4, lora_alpha=8, projection_ratio=0.25, target_modules=list(target_modules),
                       task_type=task_type, init_weights=False, init_std=0.5, seed=3)


def _autolora(target_modules, task_type):
    return AutoLoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), task_type=task_type,
                          init_weights=False)


def _prilora(target_modules, task_type):
    # Pruning from the first step on, so that training and the SFTTrainer resume test exercise it.
    return PriLoraConfig(r_first=2, r_last=4, lora_alpha=8, target_modules=list(target_modules), task_type=task_type,
                         init_weights=False, prune_every=1, prune_start=0, prune_end=3, final_sparsity=0.5)


def _heterolora(target_modules, task_type):
    # Half the candidates on; one scoring step, so training and the SFTTrainer resume test cross an allocation.
    return HeteroLoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), task_type=task_type,
                            init_weights=False, budget=0.5, proxy="grad_norm", proxy_batches=1)


def lm_batches(n: int = 2, batch: int = 4, seq: int = 8):
    """Ready causal-LM batches (with labels) for held-out data."""
    gen = torch.Generator().manual_seed(99)
    out = []
    for _ in range(n):
        ids = torch.randint(4, VOCAB, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


METHODS = {
    "rlora": MethodCase("rlora", _rlora, "rlr_"),
    "autolora": MethodCase("autolora", _autolora, "autolr_", lambda: [AutoLoraSearch(lm_batches())]),
    "prilora": MethodCase("prilora", _prilora, "prilr_"),
    "heterolora": MethodCase("heterolora", _heterolora, "hetlr_"),
}
