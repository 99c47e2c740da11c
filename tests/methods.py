"""The method configs the conformance suite runs over: a later method joins by adding one entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import PeftConfig

from peft_lowrank_ext import (AutoLoraConfig, AutoLoraSearch, HeteroLoraConfig, PriLoraConfig, RLoraConfig,
                              heterolora_allocation)
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


def switched_off_params(model) -> set[str]:
    """Names of the parameters of switched-off HeteroLoRA candidates (no effect, no gradient); empty otherwise.

    Empty for the other methods, and for HeteroLoRA while every candidate is on (before its first allocation,
    e.g. in a ``timing="window"`` scoring window). With the default ``timing="authors"`` the allocation precedes
    the first training step: call this after the first training forward. Raises if a switched-off candidate
    has no ``hetlr_`` parameters, so that a renamed module cannot make the set silently empty.
    """
    config = model.peft_config.get(model.active_adapter) if hasattr(model, "peft_config") else None
    if not isinstance(config, HeteroLoraConfig):
        return set()
    off = {name for name, entry in heterolora_allocation(model)["modules"].items() if not entry["on"]}
    prefix = METHODS["heterolora"].prefix
    tensors, found = set(), set()
    for module_name, module in model.get_base_model().named_modules():
        if module_name in off:
            own = {id(p) for n, p in module.named_parameters() if prefix in n}
            if own:
                found.add(module_name)
                tensors |= own
    assert found == off, f"switched-off candidates without {prefix} parameters: {sorted(off - found)}"
    # the PeftModel's own names (base_model.model.<module>.hetlr_A.default, ...) of those tensors
    return {n for n, p in model.named_parameters() if id(p) in tensors}


METHODS = {
    "rlora": MethodCase("rlora", _rlora, "rlr_"),
    "autolora": MethodCase("autolora", _autolora, "autolr_", lambda: [AutoLoraSearch(lm_batches())]),
    "prilora": MethodCase("prilora", _prilora, "prilr_"),
    "heterolora": MethodCase("heterolora", _heterolora, "hetlr_"),
}


def assert_same_gradients(method: str, first, second) -> None:
    """Two runs of the same step (e.g. with and without checkpointing): equal gradients, and exactly the
    switched-off HeteroLoRA candidates (the same in both) get none."""
    grads, without, off = [], [], []
    for model in (first, second):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads.append({n: p.grad.clone() for n, p in trainable.items() if p.grad is not None})
        without.append({n for n, p in trainable.items() if p.grad is None})
        off.append(switched_off_params(model))
    assert without[0] == without[1] == off[0] == off[1], (sorted(without[0]), sorted(without[1]), sorted(off[0]))
    assert bool(off[0]) == (method == "heterolora")
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def train_steps(model, steps: int = 2) -> None:
    """``steps`` AdamW steps (lr 1e-2) on tiny causal-LM batches: enough to move every adapter."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(n=steps, batch=2, seq=6):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def hand_alpha_test(fails) -> list[float]:
    """Reference alpha test for two modules: for each, the smallest scale a/10 (binary search over a = 0..10,
    the other module at 1) at which ``fails(scales)`` is false."""
    out = []
    for which in range(2):
        lo, hi = 0, 10
        while lo < hi:
            mid = (lo + hi) // 2
            s = [1.0, 1.0]
            s[which] = mid / 10
            lo, hi = (mid + 1, hi) if fails(tuple(s)) else (lo, mid)
        out.append(hi / 10)
    return out
