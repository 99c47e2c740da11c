"""Bad input at run time, for every method, judged against what PEFT's LoRA does with the same input.

* inputs of a dtype the base layer does not take (float64, int64, bf16 into an fp32 layer): the same
  error type as LoRA — the adapter neither hides nor changes the base layer's complaint;
* a float64 base model: works like LoRA (output float64, the adapter starts as a no-op);
* an empty batch: forward returns an empty output, backward and optimizer steps leave every
  parameter and buffer finite (statistics and gates are not poisoned by a mean over 0 tokens);
* sequence length 1: forward, backward and merged output agree;
* no module matching ``target_modules``: PEFT's error at wrap time, naming the targets;
* an adapter loaded onto a base model of other widths or another architecture: a clear error that
  names the module and both shapes (or the missing targets), never a silent load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_lowrank_ext import AutoLoraSearch
from methods import METHODS
from models import TINY_MODELS, VOCAB

METHOD_IDS = sorted(METHODS)
LLAMA = TINY_MODELS["llama"]


def wrap_llama(method: str, base: nn.Module | None = None):
    base = LLAMA.build() if base is None else base
    if method == "lora":
        config = LoraConfig(r=4, target_modules=list(LLAMA.target_modules), init_lora_weights=False)
    else:
        config = METHODS[method].make_config(LLAMA.target_modules, LLAMA.task_type)
    return get_peft_model(base, config)


def q_proj(model) -> nn.Module:
    return model.base_model.model.model.layers[0].self_attn.q_proj


def outcome(layer: nn.Module, x: torch.Tensor):
    """What a layer does with ``x``: ('ok', output dtype) or ('error', exception type)."""
    try:
        with torch.no_grad():
            return "ok", layer(x).dtype
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return "error", type(error)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_wrong_input_dtype_behaves_like_lora(method):
    lora_layer, layer = q_proj(wrap_llama("lora")), q_proj(wrap_llama(method))
    for dtype in (torch.float64, torch.bfloat16, torch.int64):
        x = (torch.randn(2, 3, 32) * 3).to(dtype)
        expected = outcome(lora_layer, x)
        assert expected[0] == "error"  # the fp32 base layer itself refuses it
        assert outcome(layer, x) == expected, dtype


@pytest.mark.parametrize("method", METHOD_IDS)
def test_float64_base_model_like_lora(method):
    inputs = LLAMA.inputs()
    base = LLAMA.build().double()
    with torch.no_grad():
        expected = base(**inputs).logits
    config = METHODS[method].make_config(LLAMA.target_modules, LLAMA.task_type)
    config.init_weights = True
    model = get_peft_model(base, config)
    with torch.no_grad():
        out = model(**inputs).logits
    lora_out = wrap_llama("lora", LLAMA.build().double())(**inputs).logits
    assert out.dtype == lora_out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)  # a no-op start, exactly as the base


# ----- empty batches (transformers' attention itself cannot take batch 0, so a plain MLP stack) -----


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


class TinyStack(nn.Module):
    """Two residual blocks (``blocks.N.fc``, a layout PRILoRA recognises) and a head; sum-reduced loss."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x, labels=None):
        for block in self.blocks:
            x = block(x)
        logits = self.head(x)
        loss = None if labels is None else (logits - labels).pow(2).sum()  # 0 for an empty batch
        return Output(loss, logits)


def stack_model(method: str):
    torch.manual_seed(0)
    if method == "lora":
        return get_peft_model(TinyStack(), LoraConfig(r=4, target_modules=["fc"]))
    model = get_peft_model(TinyStack(), METHODS[method].make_config(["fc"], None))
    if method == "autolora":
        held_out = [{"x": torch.randn(4, 8), "labels": torch.randn(4, 2)}]
        AutoLoraSearch(held_out).attach(model)
    return model


@pytest.mark.parametrize("method", METHOD_IDS)
def test_empty_batch_trains_without_poisoning_state(method):
    model = stack_model(method)
    lora = stack_model("lora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        out = model(torch.randn(0, 8), labels=torch.randn(0, 2))
        assert out.logits.shape == lora(torch.randn(0, 8)).logits.shape == (0, 2)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), name
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(3, 8)).logits).all()


@pytest.mark.parametrize("method", METHOD_IDS)
def test_sequence_length_one(method):
    case = TINY_MODELS["bert"]
    config = METHODS[method].make_config(case.target_modules, case.task_type)
    model = get_peft_model(case.build(), config)
    inputs = case.inputs(seq=1)
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if METHODS[method].prefix in n]
    if method == "heterolora":  # allocated before the first step (authors' timing): switched-off ones get none
        grads = [g for g in grads if g is not None]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)

    causal = wrap_llama(method).eval()
    one = LLAMA.inputs(seq=1)
    with torch.no_grad():
        adapted = causal(**one).logits
        assert adapted.shape == (2, 1, VOCAB)
        merged = causal.merge_and_unload()(**one).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_no_matching_target_modules_fails_at_wrap_like_lora(method):
    config = METHODS[method].make_config(["no_such_layer"], LLAMA.task_type)
    with pytest.raises(ValueError, match=r"Target modules .*no_such_layer.* not found") as ours:
        get_peft_model(LLAMA.build(), config)
    with pytest.raises(ValueError) as lora:
        get_peft_model(LLAMA.build(), LoraConfig(target_modules=["no_such_layer"]))
    assert type(ours.value) is type(lora.value)

    everything_excluded = METHODS[method].make_config(["q_proj"], LLAMA.task_type)
    everything_excluded.exclude_modules = {"q_proj"}
    with pytest.raises(ValueError, match="target_modules|exclude_modules|Target modules"):
        get_peft_model(LLAMA.build(), everything_excluded)


@pytest.mark.parametrize("method", ["autolora", "prilora", "heterolora"])
def test_bad_masked_kernel_choice_fails_at_wrap(method, monkeypatch):
    """A mistyped ``$PEFT_LOWRANK_EXT_MASKED_KERNEL`` is one clear line when the model is wrapped, not an error
    at the first training forward."""
    monkeypatch.setenv("PEFT_LOWRANK_EXT_MASKED_KERNEL", "tritonn")
    with pytest.raises(ValueError, match=r"^masked_lowrank: \$PEFT_LOWRANK_EXT_MASKED_KERNEL='tritonn' is not "
                                         r"allowed; use one of auto, aten, triton$"):
        get_peft_model(LLAMA.build(), METHODS[method].make_config(["q_proj"], LLAMA.task_type))
    monkeypatch.setenv("PEFT_LOWRANK_EXT_MASKED_KERNEL", "triton")  # on CPU: the custom op's PyTorch path
    model = get_peft_model(LLAMA.build(), METHODS[method].make_config(["q_proj"], LLAMA.task_type))
    model(**LLAMA.inputs()).logits.sum().backward()


def wider_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=32))


@pytest.mark.parametrize("method", METHOD_IDS)
def test_adapter_on_wrong_base_model_is_refused(method, tmp_path):
    wrap_llama(method).save_pretrained(tmp_path)
    prefix = METHODS[method].prefix
    with pytest.raises(RuntimeError) as err:
        PeftModel.from_pretrained(wider_llama(), tmp_path)
    message = str(err.value)
    # Names the adapter tensor of a concrete module and both shapes.
    assert "size mismatch for" in message and f"self_attn.q_proj.{prefix}" in message, message[:500]
    assert "from checkpoint, the shape in current model is" in message

    # Another architecture (GPT-2 has none of Llama's target modules): refused at load, naming the targets.
    with pytest.raises(ValueError, match=r"Target modules .* not found"):
        PeftModel.from_pretrained(copy.deepcopy(TINY_MODELS["gpt2"].build()), tmp_path)
