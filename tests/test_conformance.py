"""PEFT conformance: every method of the package behaves like LoRA in PEFT and transformers.

Parametrized over ``methods.METHODS`` × tiny models; a new method joins by adding its config there.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

import peft_lowrank_ext
from methods import METHODS, assert_same_gradients, switched_off_params
from models import MINILM, TINY_MODELS

METHOD_IDS = sorted(METHODS)
MODEL_IDS = sorted(TINY_MODELS)


def wrap(method: str, model_name: str, **overrides):
    case = TINY_MODELS[model_name] if model_name in TINY_MODELS else MINILM
    config = METHODS[method].make_config(case.target_modules, case.task_type, **overrides)
    return case, get_peft_model(case.build(), config)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def adapter_params(model, prefix):
    return {n: p for n, p in model.named_parameters() if prefix in n}


@pytest.mark.parametrize("model_name", MODEL_IDS)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_wrap_train_step_and_trainable_count(method, model_name):
    case, model = wrap(method, model_name)
    prefix = METHODS[method].prefix
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    own = adapter_params(model, prefix)
    assert own and all(p.requires_grad for p in own.values())
    # Only adapter tensors and the task head (modules_to_save for SEQ_CLS) are trainable.
    extra = [n for n in trainable if n not in own]
    assert all("modules_to_save" in n for n in extra), extra

    buf = io.StringIO()
    with redirect_stdout(buf):
        model.print_trainable_parameters()
    assert f"trainable params: {sum(p.numel() for p in trainable.values()):,}" in buf.getvalue()

    model.train()
    out = model(**case.inputs(), labels=_labels(case))
    out.loss.backward()
    # HeteroLoRA (timing="authors") allocates before the first step: its switched-off candidates (half of
    # them here) get no gradient from that step on; every other method trains all of its parameters.
    off = switched_off_params(model)
    assert bool(off) == (method == "heterolora") and off < set(own), sorted(off)
    for name, p in model.named_parameters():
        if name in off:
            assert p.grad is None, f"switched-off {name} got a gradient"
        elif p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


def _labels(case):
    inputs = case.inputs()
    if case.task_type == "CAUSAL_LM":
        return inputs["input_ids"]
    return torch.tensor([0, 1])


@pytest.mark.parametrize("model_name", MODEL_IDS)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_save_load_is_bit_identical_and_small(method, model_name, tmp_path):
    case, model = wrap(method, model_name)
    inputs = case.inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    prefix = METHODS[method].prefix
    own_saved = {k: v for k, v in saved.items() if prefix in k}
    # Exactly the method's parameters and persistent buffers (masks, gates) are saved, nothing regenerable.
    own_state = {k: v for k, v in model.state_dict().items() if prefix in k}
    assert len(own_saved) == len(own_state)
    assert sum(v.numel() for v in own_saved.values()) == sum(v.numel() for v in own_state.values())
    # Nothing else than the adapter tensors and the task head is stored.
    assert all(prefix in k or "classifier" in k or "score" in k for k in saved), sorted(saved)

    reloaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert torch.equal(logits(reloaded, inputs), expected)


@pytest.mark.parametrize("model_name", MODEL_IDS)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_merge_unmerge_disable(method, model_name):
    case, model = wrap(method, model_name)
    inputs = case.inputs()
    base_weights = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if "base_layer" in n}
    with model.disable_adapter():
        base_out = logits(model, inputs)
    adapted = logits(model, inputs)
    assert not torch.allclose(adapted, base_out, atol=1e-4), "adapter should change the output"

    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for n, p in model.get_base_model().named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, inputs), adapted, atol=1e-5, rtol=1e-5)

    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_safe_merge_refuses_nan(method):
    case, model = wrap(method, "llama")
    for name, p in model.named_parameters():
        if METHODS[method].prefix in name:
            with torch.no_grad():
                p.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaNs detected"):
        model.merge_adapter(safe_merge=True)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_several_adapters_set_and_delete(method):
    case = TINY_MODELS["llama"]
    make = METHODS[method].make_config
    inputs = case.inputs()
    model = get_peft_model(case.build(), make(case.target_modules, case.task_type))
    out_default = logits(model, inputs)
    model.add_adapter("other", make(case.target_modules, case.task_type))
    model.set_adapter("other")
    out_other = logits(model, inputs)
    assert not torch.allclose(out_default, out_other, atol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), out_default)
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, inputs), out_default)


@pytest.mark.parametrize("model_name", ["gpt2", "bert"])
@pytest.mark.parametrize("method", METHOD_IDS)
def test_auto_peft_model_and_transformers_load_adapter(method, model_name, tmp_path):
    case, model = wrap(method, model_name)
    inputs = case.inputs()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    case.build().save_pretrained(base_dir)
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    expected = logits(model, inputs)

    auto_cls = AutoPeftModelForCausalLM if case.task_type == "CAUSAL_LM" else AutoPeftModelForSequenceClassification
    auto = auto_cls.from_pretrained(adapter_dir)
    torch.testing.assert_close(logits(auto, inputs), expected, atol=1e-6, rtol=0)

    plain = case.build()
    plain.load_adapter(str(adapter_dir))
    torch.testing.assert_close(logits(plain, inputs), expected, atol=1e-6, rtol=0)
    status = [s for s in plain.get_adapter_state_dict().keys()] if hasattr(plain, "get_adapter_state_dict") else []
    assert any(METHODS[method].prefix in k for k in status)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_push_to_hub_folder_has_model_card_and_config(method, tmp_path):
    case, model = wrap(method, "llama")
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= files
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper()
    assert "peft" in (tmp_path / "README.md").read_text().lower()


@pytest.mark.parametrize("method", METHOD_IDS)
def test_export_lora_loads_in_plain_peft_in_fresh_process(method, tmp_path):
    jobs = []
    for model_name in MODEL_IDS:
        case, model = wrap(method, model_name)
        root = tmp_path / model_name
        case.build().save_pretrained(root / "base")
        peft_lowrank_ext.export_lora(model, root / "lora")
        inputs = case.inputs()
        torch.save({"inputs": inputs, "expected": logits(model, inputs)}, root / "io.pt")
        jobs.append((str(root), case.auto_class))
        exported = json.loads((root / "lora" / "adapter_config.json").read_text())
        assert exported["peft_type"] == "LORA"

    script = textwrap.dedent(
        """
        import json, sys, torch, transformers
        from peft import PeftModel
        worst = 0.0
        for root, auto_class in json.loads(sys.argv[1]):
            base = getattr(transformers, auto_class).from_pretrained(root + "/base")
            model = PeftModel.from_pretrained(base, root + "/lora").eval()
            data = torch.load(root + "/io.pt")
            with torch.no_grad():
                out = model(**data["inputs"]).logits
            worst = max(worst, (out - data["expected"]).abs().max().item())
        assert "peft_lowrank_ext" not in sys.modules
        print("MAXDIFF", worst)
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("MAXDIFF")[1])
    assert worst < 1e-5


@pytest.mark.parametrize("method", METHOD_IDS)
def test_gradient_checkpointing_matches(method):
    case = TINY_MODELS["llama"]
    inputs = case.inputs()
    runs = []
    for checkpointing in (False, True):
        config = METHODS[method].make_config(case.target_modules, case.task_type)
        model = get_peft_model(case.build(), config)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        runs.append(model)
    assert_same_gradients(method, *runs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHOD_IDS)
def test_half_precision_base_model(method, dtype):
    case = TINY_MODELS["llama"]
    config = METHODS[method].make_config(case.target_modules, case.task_type)
    model = get_peft_model(case.build().to(dtype), config)
    own = adapter_params(model, METHODS[method].prefix)
    assert all(p.dtype == torch.float32 for p in own.values()), "adapter weights stay fp32 (PEFT autocast)"
    model.train()
    inputs = case.inputs()
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.logits.dtype == dtype
    out.loss.backward()
    # Switched-on adapter weights get finite gradients; exactly the switched-off HeteroLoRA candidates get none.
    off = switched_off_params(model)
    assert bool(off) == (method == "heterolora") and off < set(own), sorted(off)
    assert {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None} == off
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for n, p in own.items() if n not in off)
    merged = model.merge_and_unload()
    assert all(p.dtype == dtype for p in merged.parameters())


@pytest.mark.parametrize("method", METHOD_IDS)
def test_real_minilm_roundtrip(method, tmp_path):
    case, model = wrap(method, "minilm")
    inputs = case.inputs(seq=12)
    model.train()
    model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    model.eval()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert torch.equal(logits(reloaded, inputs), expected)
