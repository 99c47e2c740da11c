"""The method cases, data and training loop shared by the data-parallel workers and their tests.

One training loop serves three roles: a DDP replica (``rank`` of ``world`` sees its slice of every
global batch), an FSDP2 or FSDP1 replica, and the single-process reference (``world=1`` sees the whole
global batch). Every global batch has the same shape and every token is labelled, so the mean loss
of the concatenated batch equals the mean of the replicas' mean losses — the quantity DDP's
gradient averaging reproduces.

Not collected by pytest (no ``test_`` prefix); importable from the tests folder and from workers.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable

import torch

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # tests/ (models.py) and the repository (the package)

from peft import get_peft_model  # noqa: E402

from models import VOCAB, TINY_MODELS  # noqa: E402
from peft_lowrank_ext import (  # noqa: E402
    AutoLoraConfig,
    AutoLoraSearch,
    HeteroLoraConfig,
    HeteroLoraData,
    PriLoraConfig,
    RLoraConfig,
    heterolora_score,
)

LLAMA = TINY_MODELS["llama"]
STEPS = 6
LOCAL_BATCH = 2
SEQ = 8
WORLD = 2
HELD_OUT_BATCHES = 2


@dataclass(frozen=True)
class DpCase:
    name: str
    prefix: str
    make_config: Callable[[], object]
    needs_held_out: bool = False
    prescore: bool = False  # HeteroLoRA: heterolora_score on the first training batches before wrapping
    attach_inside: bool = False  # AutoLoRA: attach the held-out data to the PEFT model, not to its wrapper
    attach_data: bool = True  # HeteroLoRA: attach HeteroLoraData() to what trains (FSDP scores through it)


def _targets() -> list[str]:
    return list(LLAMA.target_modules)


CASES = {
    # PAC-Bayes on, σ_q learned, noise injection on: the noise is one draw per module per forward
    # (z-shaped, not per example), identical on all replicas seeded alike, as in one process.
    "rlora": DpCase("rlora", "rlr_", lambda: RLoraConfig(
        r=4, lora_alpha=8, projection_ratio=0.25, target_modules=_targets(), task_type="CAUSAL_LM",
        init_weights=False, init_std=0.5, seed=3, pac_bayes_weight=0.5, num_train_examples=64,
        learn_posterior_sigma=True, noise_injection=True)),
    # Second-order search (the default); each replica gets a different held-out shard.
    "autolora": DpCase("autolora", "autolr_", lambda: AutoLoraConfig(
        r=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False, arch_lr=0.05),
        needs_held_out=True),
    "prilora": DpCase("prilora", "prilr_", lambda: PriLoraConfig(
        r_first=2, r_last=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False,
        prune_every=1, prune_start=0, prune_end=4, final_sparsity=0.5)),
    # Two scoring steps, then 4 training steps with half of the 10 candidates on (8 LoRA + 2 shortcuts).
    "heterolora_static": DpCase("heterolora_static", "hetlr_", lambda: HeteroLoraConfig(
        r=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False, budget=0.5,
        proxy="synflow", proxy_batches=2, shortcuts=["residual_1"], shortcut_r=2)),
    # Re-allocation every 2 steps, each scored by an extra pass on the replica's own batch.
    "heterolora_dynamic": DpCase("heterolora_dynamic", "hetlr_", lambda: HeteroLoraConfig(
        r=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False, budget=0.5,
        proxy="snip", proxy_batches=1, mode="dynamic", realloc_every=2, shortcuts=["residual_1"], shortcut_r=2)),
}

# FSDP runs: the configurations that work, compared with one process like DDP ...
FSDP2_CASES = {
    # Learned σ_q is a 1-element vector (fully_shard refuses 0-d parameters), so the full case runs.
    "rlora": CASES["rlora"],
    # First-order search: its held-out pass goes through the fully_shard root it was attached to.
    "autolora": CASES["autolora"],
    "rlora_fixed_sigma": DpCase("rlora_fixed_sigma", "rlr_", lambda: RLoraConfig(
        r=4, lora_alpha=8, projection_ratio=0.25, target_modules=_targets(), task_type="CAUSAL_LM",
        init_weights=False, init_std=0.5, seed=3, pac_bayes_weight=0.5, num_train_examples=64)),
    "prilora": CASES["prilora"],
    # Scoring through the fully_shard model (HeteroLoraData attached to it): SynFlow static, SNIP dynamic.
    "heterolora_static": CASES["heterolora_static"],
    "heterolora_dynamic": CASES["heterolora_dynamic"],
    # Allocated before sharding, then static: no scoring window runs on sharded A/B.
    "heterolora_prescored": DpCase("heterolora_prescored", "hetlr_", lambda: HeteroLoraConfig(
        r=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False, budget=0.5,
        proxy="snip", proxy_batches=2, shortcuts=["residual_1"], shortcut_r=2), prescore=True),
}
FSDP1_CASES = {
    # The PAC-Bayes step and pruning gather whole tensors (summon_full_params) outside forward.
    "rlora": CASES["rlora"],
    "rlora_fixed_sigma": FSDP2_CASES["rlora_fixed_sigma"],
    "prilora": CASES["prilora"],
    # First-order search, attached to the FSDP1 wrapper (its held-out pass goes through it).
    "autolora": CASES["autolora"],
    "rlora_no_pac_bayes": DpCase("rlora_no_pac_bayes", "rlr_", lambda: RLoraConfig(
        r=4, lora_alpha=8, projection_ratio=0.25, target_modules=_targets(), task_type="CAUSAL_LM",
        init_weights=False, init_std=0.5, seed=3)),
    "heterolora_static": CASES["heterolora_static"],
    "heterolora_dynamic": CASES["heterolora_dynamic"],
    "heterolora_prescored": FSDP2_CASES["heterolora_prescored"],
}
FSDP_CASES = {"fsdp2": FSDP2_CASES, "fsdp1": FSDP1_CASES}
# ... and those they refuse, with the part of the error they must raise.
FSDP_REFUSED = {
    "fsdp2": {
        "autolora_darts": "AutoLoRA search with hypergradient='darts_real_step' under FSDP2 (fully_shard) is not "
                          "supported",
        "heterolora_unattached": "HeteroLoRA scoring under FSDP2 (fully_shard) needs the sharded model",
        "heterolora_window": "HeteroLoRA scoring under FSDP2 (fully_shard) is not supported with timing='window'",
    },
    "fsdp1": {
        "autolora_darts": "AutoLoRA search with hypergradient='darts_real_step' under FSDP1 "
                          "(FullyShardedDataParallel) is not supported",
        "autolora_attached_inside": "AutoLoraSearch is attached to a module inside the FSDP model",
        "heterolora_unattached": "HeteroLoRA scoring under FSDP1 (FullyShardedDataParallel) needs the sharded model",
        "heterolora_window": "HeteroLoRA scoring under FSDP1 (FullyShardedDataParallel) is not supported with "
                             "timing='window'",
    },
}
# The authors' DARTS hypergradient: it steps and rolls back the optimizer (refused under FSDP2 and ZeRO).
AUTOLORA_DARTS = DpCase("autolora_darts", "autolr_", lambda: AutoLoraConfig(
    r=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False, arch_lr=0.05,
    hypergradient="darts_real_step"), needs_held_out=True)
# Held-out data attached to the PeftModel inside an FSDP1 wrapper: the pass would bypass the root unit.
AUTOLORA_INSIDE = DpCase("autolora_attached_inside", "autolr_", CASES["autolora"].make_config, needs_held_out=True,
                         attach_inside=True)
# HeteroLoRA scoring under FSDP without the sharded model to score through, and with the window timing.
HETERO_UNATTACHED = DpCase("heterolora_unattached", "hetlr_", CASES["heterolora_static"].make_config,
                           attach_data=False)
HETERO_WINDOW = DpCase("heterolora_window", "hetlr_", lambda: HeteroLoraConfig(
    r=4, lora_alpha=8, target_modules=_targets(), task_type="CAUSAL_LM", init_weights=False, budget=0.5,
    proxy="snip", proxy_batches=2, timing="window"))
ALL_CASES = {**CASES, **FSDP2_CASES, **FSDP1_CASES, "autolora_darts": AUTOLORA_DARTS,
             "autolora_attached_inside": AUTOLORA_INSIDE, "heterolora_unattached": HETERO_UNATTACHED,
             "heterolora_window": HETERO_WINDOW}
# DeepSpeed ZeRO-2 / ZeRO-3 runs (stage:case) through deepspeed.initialize, compared with one process ...
DEEPSPEED_RUNS = [f"{stage}:{name}" for stage in (2, 3)
                  for name in ("rlora", "autolora", "prilora", "heterolora_static", "heterolora_dynamic",
                               "heterolora_prescored", "autolora_darts")]
# Gradient accumulation (2 micro-batches per step), for the methods whose per-step work does not depend on
# the forward count (RLoRA's noise is one draw per forward; HeteroLoRA scores the step's last micro-batch).
DEEPSPEED_RUNS += [f"{stage}:{name}@gas2" for stage in (2, 3) for name in ("rlora_fixed_sigma", "autolora", "prilora")]
# ... and through HF Trainer(TrainingArguments(deepspeed=...)), its defaults (AdamW, clipping 1.0).
DEEPSPEED_TRAINER_RUNS = [f"{stage}:{name}" for stage in (2, 3)
                          for name in ("rlora", "autolora", "prilora", "heterolora_dynamic", "sft_rlora", "sft_prilora")]
# What each stage refuses, with the part of the error it must raise.
DARTS_UNDER_ZERO = "AutoLoRA search with hypergradient='darts_real_step' under DeepSpeed ZeRO is not supported"
DEEPSPEED_REFUSED = {
    2: {"autolora_darts": DARTS_UNDER_ZERO},
    3: {"autolora_darts": DARTS_UNDER_ZERO},
}


# ----- data -------------------------------------------------------------------------------------
def _global_batch(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (WORLD * LOCAL_BATCH, SEQ), generator=gen)


def _lm_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _shard(ids: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Replica ``rank`` of ``world`` gets rows ``[rank·n/world, (rank+1)·n/world)``; world 1 gets all."""
    n = ids.shape[0] // world
    return ids[rank * n:(rank + 1) * n]


def train_batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    return _lm_batch(_shard(_global_batch(1000 + step), rank, world))


def held_out_batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Each replica's own held-out shard (different data per replica); world 1 gets their concatenation."""
    return [_lm_batch(_shard(_global_batch(5000 + i), rank, world)) for i in range(HELD_OUT_BATCHES)]


# ----- model and loop ---------------------------------------------------------------------------
def build_model(case: DpCase):
    torch.manual_seed(0)
    model = get_peft_model(LLAMA.build(), case.make_config())
    model.train()
    return model


def make_optimizer(model) -> torch.optim.Optimizer:
    # SGD with momentum: an error of the gradient's rounding stays of that size (Adam's first steps
    # are ±lr whatever the gradient's size, which would turn rounding into lr-sized differences).
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def train(case: DpCase, rank: int, world: int, wrap: Callable = lambda m: m, steps: int = STEPS):
    """Train ``steps`` optimizer steps on this replica's slices; returns the (unwrapped) PEFT model."""
    model = build_model(case)
    if case.prescore:
        heterolora_score(model, [train_batch(step, rank, world) for step in range(2)])
    net = wrap(model)
    if case.needs_held_out:  # attached to what trains (an FSDP1 wrapper runs the held-out pass)
        AutoLoraSearch(held_out_batches(rank, world)).attach(model if case.attach_inside else net)
    if case.prefix == "hetlr_" and not case.prescore and case.attach_data:  # scoring through what trains
        HeteroLoraData().attach(net)
    opt = make_optimizer(model)
    torch.manual_seed(1)  # the RLoRA noise draws: the same stream on every replica and in one process
    for step in range(steps):
        net(**train_batch(step, rank, world)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def deepspeed_config(stage: int, accumulation: int = 1) -> dict:
    """ZeRO ``stage`` with the loop above: SGD from the client (untested by DeepSpeed, allowed), no clipping,
    fp32; each replica's batch in ``accumulation`` micro-batches."""
    return {"train_micro_batch_size_per_gpu": LOCAL_BATCH // accumulation, "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}


def train_deepspeed(case: DpCase, rank: int, world: int, stage: int, steps: int = STEPS, accumulation: int = 1):
    """``train`` through ``deepspeed.initialize`` (ZeRO ``stage``): ``engine.backward`` / ``engine.step`` per
    micro-batch; the optimizer (and the method's per-step work) runs once per ``accumulation`` of them."""
    import deepspeed

    model = build_model(case)
    if case.needs_held_out:
        AutoLoraSearch(held_out_batches(rank, world)).attach(model)
    if case.prescore:
        heterolora_score(model, [train_batch(step, rank, world) for step in range(2)])
    engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model),
                                      config=deepspeed_config(stage, accumulation))
    torch.manual_seed(1)
    for step in range(steps):
        batch = train_batch(step, rank, world)
        micro = LOCAL_BATCH // accumulation
        for i in range(accumulation):
            engine.backward(engine(**{k: v[i * micro:(i + 1) * micro] for k, v in batch.items()}).loss)
            engine.step()
    return model


def gathered_adapter_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """``adapter_state`` of a model whose parameters ZeRO-3 may have partitioned (gathered first)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return adapter_state(model, prefix)
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return adapter_state(model, prefix)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor; other tensors as they are."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().clone()


def adapter_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """Every adapter tensor: trainable factors and all buffers (masks, gates, β and its moments,
    statistics, allocation state and history), full size."""
    return {k: full_tensor(v) for k, v in model.state_dict().items() if prefix in k}

