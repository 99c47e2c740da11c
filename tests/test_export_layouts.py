"""``export_lora`` layouts for serving: ``uniform`` (one global r, scales folded into B, no patterns) and ``compact``
(``rank_pattern``/``alpha_pattern``), and ``head="separate"`` (modules_to_save written beside the adapter)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from methods import METHODS, train_steps
from models import TINY_MODELS
from peft_lowrank_ext import autolora_select, export_lora
from peft_lowrank_ext.export import load_head

LLAMA, BERT = TINY_MODELS["llama"], TINY_MODELS["bert"]


def _train(model, steps: int = 2) -> None:
    train_steps(model, steps)
    model.eval()


def _adapted(method: str):
    """A llama adapter with different ranks / scales per module where the method has them."""
    model = get_peft_model(LLAMA.build(), METHODS[method].make_config(LLAMA.target_modules, LLAMA.task_type))
    if method == "autolora":  # select ranks 1..4 per module
        for i, (name, module) in enumerate((n, m) for n, m in model.named_modules() if hasattr(m, "export_factors")):
            beta = torch.full((4,), -5.0)
            beta[: i % 4 + 1] = 1.0
            module._store("beta")["default"].copy_(beta)
        autolora_select(model)
    elif method in ("prilora", "heterolora"):  # PRILoRA: ranks 2/4, scales 4/2, pruned; HeteroLoRA: half off
        _train(model)
    return model.eval()


def _live_deltas(model) -> dict[str, torch.Tensor]:
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "export_factors"):
            factors = module.export_factors("default")
            if factors is not None:
                a, b, scaling = factors
                deltas[name.removeprefix("base_model.model.")] = (b.float() @ a.float()) * scaling
    return deltas


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("layout", ["uniform", "compact"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_export_layouts_load_in_plain_peft_with_identical_outputs(method, layout, tmp_path):
    model = _adapted(method)
    inputs = LLAMA.inputs()
    expected = _logits(model, inputs)
    config = export_lora(model, tmp_path, layout=layout, head="separate")  # no modules_to_save: no head file
    assert not (tmp_path / "head.safetensors").exists()

    plain = PeftModel.from_pretrained(LLAMA.build(), tmp_path).eval()  # plain PEFT, none of this package's loaders
    adapted = [m for m in plain.modules() if isinstance(m, LoraLayer)]
    assert adapted and all(type(m).__module__.startswith("peft.") for m in adapted)
    torch.testing.assert_close(_logits(plain, inputs), expected, atol=1e-5, rtol=0)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    deltas = _live_deltas(model)
    assert sorted(saved["target_modules"]) == sorted(deltas)
    live_ranks = {}
    for name, module in model.named_modules():
        if hasattr(module, "export_factors") and module.export_factors("default") is not None:
            live_ranks[name.removeprefix("base_model.model.")] = module.export_factors("default")[0].shape[0]
    if layout == "uniform":
        r = saved["r"]
        assert "rank_pattern" not in saved and "alpha_pattern" not in saved
        assert r == max(live_ranks.values()) and saved["lora_alpha"] == r == config.r
        for key, delta in deltas.items():
            a = tensors[f"base_model.model.{key}.lora_A.weight"]
            b = tensors[f"base_model.model.{key}.lora_B.weight"]
            assert a.shape[0] == r and b.shape[1] == r
            kept = live_ranks[key]  # zero padding: extra rows of A and columns of B
            assert not a[kept:].any() and not b[:, kept:].any()
            # what a server reading only r and lora_alpha computes (vLLM's PEFTHelper) is the live ΔW
            torch.testing.assert_close(saved["lora_alpha"] / r * (b @ a), delta, atol=1e-6, rtol=1e-5)
    else:
        for key in deltas:
            assert tensors[f"base_model.model.{key}.lora_A.weight"].shape[0] == live_ranks[key]
        if method in ("prilora", "autolora"):  # ranks (and PRILoRA's scales) differ: they need the patterns
            assert saved["rank_pattern"]
            assert len(set(live_ranks.values())) > 1


def test_compact_is_the_smaller_file_and_layouts_are_checked(tmp_path):
    model = _adapted("prilora")
    export_lora(model, tmp_path / "uniform")
    export_lora(model, tmp_path / "compact", layout="compact")
    size = {k: (tmp_path / k / "adapter_model.safetensors").stat().st_size for k in ("uniform", "compact")}
    assert size["compact"] < size["uniform"]  # the default is uniform
    with pytest.raises(ValueError, match="layout='padded'"):
        export_lora(model, tmp_path / "x", layout="padded")
    with pytest.raises(ValueError, match="head='drop'"):
        export_lora(model, tmp_path / "x", head="drop")


@pytest.mark.parametrize("layout", ["uniform", "compact"])
@pytest.mark.parametrize("method", ["prilora", "rlora"])
def test_separate_head_plus_adapter_reproduce_the_classifier(method, layout, tmp_path):
    model = get_peft_model(BERT.build(), METHODS[method].make_config(BERT.target_modules, BERT.task_type))
    head = model.base_model.model.classifier.modules_to_save["default"]
    with torch.no_grad():  # a trained head, different from the fresh base model's
        head.weight.add_(torch.randn_like(head.weight))
        head.bias.add_(1.0)
    model.eval()
    inputs = BERT.inputs()
    expected = _logits(model, inputs)

    config = export_lora(model, tmp_path, layout=layout, head="separate")
    assert config.modules_to_save is None
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not saved.get("modules_to_save")
    assert not any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    head_state = load_file(tmp_path / "head.safetensors")
    assert sorted(head_state) == ["classifier.bias", "classifier.weight"]

    # plain torch: load the head into the base model, then the adapter with plain PEFT
    base = BERT.build()
    result = base.load_state_dict(head_state, strict=False)
    assert not result.unexpected_keys
    plain = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(_logits(plain, inputs), expected, atol=1e-5, rtol=0)
    # the helper does the same; without the head the outputs differ (the head matters)
    base = BERT.build()
    assert load_head(base, tmp_path) == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, tmp_path).eval(), inputs), expected,
                               atol=1e-5, rtol=0)
    headless = PeftModel.from_pretrained(BERT.build(), tmp_path).eval()
    assert not torch.allclose(_logits(headless, inputs), expected, atol=1e-3)
    # head="keep" (PEFT's own way) writes no head file and keeps modules_to_save
    kept = export_lora(model, tmp_path, layout=layout)
    assert kept.modules_to_save and not (tmp_path / "head.safetensors").exists()
