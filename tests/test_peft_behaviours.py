"""PEFT behaviours users rely on, for every method (what ``test_conformance.py`` does not already cover).

* ``get_nb_trainable_parameters`` counts exactly the parameters that require grad (and all of them);
* ``get_model_status`` / ``get_layer_status`` report the method's PEFT type, adapter names, enabled and
  merged state, per-adapter ``requires_grad`` and available adapters, following ``add_adapter``,
  ``set_adapter``, ``merge_adapter``, ``unmerge_adapter`` and ``disable_adapter``;
* ``modules_to_save`` on a causal LM (``lm_head``): trained, saved, reloaded exactly, the base copy untouched;
* ``layers_to_transform`` + ``layers_pattern`` and ``exclude_modules`` (list and regex) pick exactly
  the expected modules (for PRILoRA the depth rank still follows the block index);
* GPT-2 ``Conv1D``: ``fan_in_fan_out`` corrected with LoRA's warning, ΔW in the (in, out) layout;
* tied embeddings (GPT-2): attention targets save/load bit-identically, ``merge_and_unload`` keeps
  ``lm_head`` tied to the input embedding with the adapted outputs; targeting the tied ``lm_head``
  gives PEFT's tied-weights warning, as for LoRA.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from methods import METHODS, lm_batches
from models import TINY_MODELS
from peft_lowrank_ext import AutoLoraSearch

METHOD_IDS = sorted(METHODS)
LLAMA, GPT2 = TINY_MODELS["llama"], TINY_MODELS["gpt2"]
LAYER_CLASS = {"rlora": "RLoraLinear", "autolora": "AutoLoraLinear", "prilora": "PriLoraLinear",
               "heterolora": "HeteroLoraLinear"}


def make(method, case, targets=None, **fields):
    config = METHODS[method].make_config(targets or case.target_modules, case.task_type)
    for name, value in fields.items():
        setattr(config, name, value)
    type(config).__post_init__(config)  # re-validate and normalise after the edits
    return config


def adapted_names(model) -> set[str]:
    """Names of the wrapped base layers (relative to the transformers model)."""
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and hasattr(m, "base_layer")}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("method", METHOD_IDS)
def test_trainable_counts_and_status_follow_adapter_state(method):
    model = get_peft_model(LLAMA.build(), make(method, LLAMA))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    assert total == sum(p.numel() for p in model.parameters())

    peft_type = METHODS[method].name.upper()
    status = model.get_model_status()
    assert status.peft_types == {"default": peft_type}
    assert (status.enabled, status.active_adapters, status.merged_adapters) == (True, ["default"], [])
    assert status.requires_grad == {"default": True} and status.available_adapters == ["default"]
    assert status.trainable_params == trainable and status.total_params == total
    layers = model.get_layer_status()
    assert layers and len(layers) == status.num_adapter_layers
    assert {s.module_type.split(".")[-1] for s in layers} == {LAYER_CLASS[method]}

    model.add_adapter("other", make(method, LLAMA))
    model.set_adapter("other")
    status = model.get_model_status()
    assert status.active_adapters == ["other"] and status.available_adapters == ["default", "other"]
    assert status.requires_grad == {"default": False, "other": True}
    model.merge_adapter()
    assert model.get_model_status().merged_adapters == ["other"]
    assert all(s.merged_adapters == ["other"] for s in model.get_layer_status())
    model.unmerge_adapter()
    assert model.get_model_status().merged_adapters == []
    with model.disable_adapter():
        assert model.get_model_status().enabled is False
        assert not any(s.enabled for s in model.get_layer_status())
    assert model.get_model_status().enabled is True


@pytest.mark.parametrize("method", METHOD_IDS)
def test_modules_to_save_trained_saved_loaded_exactly(method, tmp_path):
    extra = {"hypergradient": "first_order"} if method == "autolora" else {}  # the search itself is not the point
    model = get_peft_model(LLAMA.build(), make(method, LLAMA, modules_to_save=["lm_head"], **extra))
    original_head = model.base_model.model.lm_head.original_module.weight.detach().clone()
    assert model.base_model.model.lm_head.modules_to_save["default"].weight.requires_grad
    if method == "autolora":
        AutoLoraSearch(lm_batches()).attach(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    inputs = LLAMA.inputs()
    model.train()
    for _ in range(2):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained_head = model.base_model.model.lm_head.modules_to_save["default"].weight.detach().clone()
    assert not torch.equal(trained_head, original_head), "lm_head copy was not trained"
    assert torch.equal(model.base_model.model.lm_head.original_module.weight, original_head)

    model.eval()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    head_keys = [k for k in saved if "lm_head" in k]
    assert len(head_keys) == 1 and torch.equal(saved[head_keys[0]], trained_head)
    reloaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    assert torch.equal(reloaded.base_model.model.lm_head.modules_to_save["default"].weight, trained_head)
    assert torch.equal(logits(reloaded, inputs), expected)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_layers_to_transform_and_exclude_modules(method):
    model = get_peft_model(LLAMA.build(), make(method, LLAMA, layers_to_transform=[1], layers_pattern="layers"))
    chosen = adapted_names(model)
    expected = {f"model.layers.1.{sub}" for sub in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj",
                                                      "mlp.down_proj")}
    assert chosen == expected
    if method == "prilora":  # depth ranks follow the block index, not the count of adapted blocks
        layer = model.base_model.model.model.layers[1].self_attn.q_proj
        assert layer._store("r")["default"] == model.peft_config["default"].r_last

    model = get_peft_model(LLAMA.build(), make(method, LLAMA, exclude_modules=["v_proj", "0.mlp.down_proj"]))
    chosen = adapted_names(model)
    assert not any(n.endswith("v_proj") for n in chosen) and "model.layers.0.mlp.down_proj" not in chosen
    assert "model.layers.1.mlp.down_proj" in chosen and "model.layers.0.self_attn.q_proj" in chosen

    model = get_peft_model(LLAMA.build(), make(method, LLAMA, exclude_modules=r".*\.1\..*"))
    assert adapted_names(model) and all(re.search(r"layers\.0\.", n) for n in adapted_names(model))


@pytest.mark.parametrize("method", METHOD_IDS)
def test_conv1d_fan_in_fan_out_corrected_and_delta_layout(method):
    config = make(method, GPT2, targets=["c_attn"], fan_in_fan_out=False)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False"):
        model = get_peft_model(GPT2.build(), config)
    assert model.peft_config["default"].fan_in_fan_out is True
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    base_weight = layer.get_base_layer().weight  # Conv1D: (in, out)
    delta = layer.get_delta_weight("default")
    assert delta.shape == base_weight.shape == (32, 96) and delta.abs().sum() > 0
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.get_base_layer()(x), x @ delta, atol=1e-5, rtol=1e-5)


def _tied(model) -> bool:
    return model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("method", METHOD_IDS)
def test_tied_embeddings_save_load_and_merge(method, tmp_path):
    base = GPT2.build()
    assert _tied(base)
    model = get_peft_model(base, make(method, GPT2))
    inputs = GPT2.inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("wte" in k or "lm_head" in k for k in saved)
    reloaded = PeftModel.from_pretrained(GPT2.build(), tmp_path)
    assert torch.equal(logits(reloaded, inputs), expected)
    merged = reloaded.merge_and_unload()
    assert _tied(merged)
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["rlora", "autolora", "heterolora"])
def test_targeting_tied_lm_head_warns_like_lora(method):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(GPT2.build(), make(method, GPT2, targets=["c_attn", "lm_head"]))
    assert any("tie_word_embeddings=True" in str(w.message) for w in caught)


def test_prilora_refuses_lm_head_without_block_index():
    with pytest.raises(ValueError, match=r"block index of module 'lm_head'.*exclude_modules"):
        get_peft_model(GPT2.build(), make("prilora", GPT2, targets=["c_attn", "lm_head"]))
