"""Numerical robustness of every method beyond what ``test_conformance.py`` covers.

(Conformance already checks: bf16/fp16 Llama forward/backward with fp32 adapters, non-reentrant
gradient checkpointing on Llama, ``merge_adapter(safe_merge=True)`` refusing NaN weights set by hand.)
Here:

* half-precision GPT-2 (``Conv1D``, ``fan_in_fan_out``): fp32 adapters, several optimizer steps with
  finite losses, output dtype of the base, merged model within half-precision tolerance of the adapter;
* *reentrant* gradient checkpointing on GPT-2: gradients equal to the plain run;
* ``torch.compile`` (inductor) of one model carrying all four methods (one compile keeps it cheap):
  outputs and gradients equal to eager;
* a NaN training step (NaN loss) never passes silently: adapter state and outputs show it, and
  ``merge_and_unload(safe_merge=True)`` raises PEFT's "NaNs detected in the merged weights..." message
  leaving the base weights untouched; learning rate 1e6: every weight stays finite and merging is
  exact, or merging refuses the same way; learning rate 1e-12: all finite, merge exact.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from torch import nn

from methods import METHODS, assert_same_gradients, lm_batches
from models import TINY_MODELS
from peft_lowrank_ext import AutoLoraSearch
from test_bad_input import Block, TinyStack

METHOD_IDS = sorted(METHODS)
GPT2 = TINY_MODELS["gpt2"]
LLAMA = TINY_MODELS["llama"]
NAN_MESSAGE = "NaNs detected in the merged weights. The adapter default seems to be broken"


def wrap(method: str, case, base: nn.Module | None = None, second_order: bool = False):
    """The method's test config; AutoLoRA searches first-order unless asked (its hypergradient is not the point)."""
    config = METHODS[method].make_config(case.target_modules, case.task_type)
    if method == "autolora" and not second_order:
        config.hypergradient = "first_order"
    model = get_peft_model(case.build() if base is None else base, config)
    if method == "autolora":
        AutoLoraSearch(lm_batches()).attach(model)
    return model


def own_params(model, method):
    return {n: p for n, p in model.named_parameters() if METHODS[method].prefix in n}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHOD_IDS)
def test_half_precision_conv1d_trains_and_merges(method, dtype):
    model = wrap(method, GPT2, GPT2.build().to(dtype))
    own = own_params(model, method)
    assert own and all(p.dtype == torch.float32 for p in own.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = GPT2.inputs()
    model.train()
    for _ in range(3):
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.logits.dtype == dtype and torch.isfinite(out.loss)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in own.values())
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        merged_model = model.merge_and_unload(safe_merge=True)
        merged = merged_model(**inputs).logits
    assert all(p.dtype == dtype for p in merged_model.parameters())
    assert torch.isfinite(adapted).all()
    torch.testing.assert_close(merged.float(), adapted.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_reentrant_gradient_checkpointing_matches(method):
    inputs = GPT2.inputs()
    runs = []
    for checkpointing in (False, True):
        model = wrap(method, GPT2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        runs.append(model)
    assert_same_gradients(method, *runs)


class FourBlockStack(TinyStack):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(len(METHOD_IDS))])


def all_methods_model() -> nn.Module:
    """Block ``i`` carries method ``i``: one compile covers every method's forward and backward."""
    torch.manual_seed(0)
    model = FourBlockStack()
    for index, method in enumerate(METHOD_IDS):
        config = METHODS[method].make_config([f"blocks.{index}.fc"], None)
        if method == "prilora":
            config.num_blocks = len(METHOD_IDS)
        inject_adapter_in_model(config, model)
    return model


def test_torch_compile_matches_eager_for_every_method():
    model = all_methods_model().train()
    prefixes = {m: METHODS[m].prefix for m in METHOD_IDS}
    x, y = torch.randn(5, 8), torch.randn(5, 2)
    eager = model(x, labels=y)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert {m for m, pre in prefixes.items() if any(pre in n for n in eager_grads)} == set(METHOD_IDS)
    model.zero_grad()

    torch._dynamo.reset()
    compiled = torch.compile(model)
    out = compiled(x, labels=y)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-4, rtol=1e-4)


def train_llama(method: str, lr: float, steps: int, poison_step: int | None = None):
    """Adam on tiny Llama; at ``poison_step`` the loss is multiplied by NaN (a diverged step)."""
    model = wrap(method, LLAMA, second_order=poison_step is not None)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    inputs = LLAMA.inputs()
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        if step == poison_step:
            loss = loss * float("nan")
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval(), losses, inputs


def assert_merge_refused(model):
    base_before = {n: p.clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match=NAN_MESSAGE):
        model.merge_and_unload(safe_merge=True)
    for name, value in model.get_base_model().named_parameters():
        if name in base_before:
            assert torch.equal(value, base_before[name]), f"a refused merge changed {name}"


def nonfinite_state(model) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]


@pytest.mark.parametrize("method", METHOD_IDS)
def test_nan_step_is_never_silent(method):
    """A NaN loss poisons the adapter; the poison is visible (outputs) and merging refuses it."""
    model, losses, inputs = train_llama(method, lr=1e-3, steps=2, poison_step=1)
    assert losses[0] == losses[0] and losses[1] != losses[1]  # the NaN step itself
    assert nonfinite_state(model), "a NaN gradient step left no trace in the adapter"
    with torch.no_grad():
        assert not torch.isfinite(model(**inputs).logits).all()
    assert_merge_refused(model)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_huge_learning_rate_is_finite_or_refused_at_merge(method):
    """lr=1e6: either every weight stays finite and merging is exact, or merging refuses the NaN/inf."""
    model, losses, inputs = train_llama(method, lr=1e6, steps=3)
    with torch.no_grad():
        adapted = model(**inputs).logits
    if nonfinite_state(model) or not torch.isfinite(adapted).all():
        assert_merge_refused(model)
        return
    with torch.no_grad():
        merged = model.merge_and_unload(safe_merge=True)(**inputs).logits
    scale = adapted.abs().max().item()
    torch.testing.assert_close(merged, adapted, atol=1e-4 * max(scale, 1.0), rtol=1e-3)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_tiny_learning_rate_stays_finite_and_merges_exactly(method):
    model, losses, inputs = train_llama(method, lr=1e-12, steps=2)
    assert all(loss == loss for loss in losses) and not nonfinite_state(model)
    with torch.no_grad():
        adapted = model(**inputs).logits
        merged = model.merge_and_unload(safe_merge=True)(**inputs).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
