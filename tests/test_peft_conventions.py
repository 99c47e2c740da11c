"""PEFT conventions that PEFT's own common suite (tests/peft_suite) found broken, one test group per fix.

* ``init_weights=False`` gives a non-trivial adapter for every method (RLoRA stayed an identity: ``init_std``
  defaulted to 0);
* ``bias="all"`` / ``"lora_only"`` train, save, reload and export the base model's biases as LoRA does (every
  method refused them);
* ``add_weighted_adapter`` combines adapters exactly (``"cat"``) or refuses in one clear line (it raised a bare
  ``AttributeError`` for every method);
* HeteroLoRA saves nothing non-finite (``proxy_last`` held a NaN sentinel), and still loads such older files;
* ``autocast_adapter_dtype=False`` keeps trainable adapter weights in the base layer's dtype, as LoRA does
  (they were forced to fp32).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from peft_lowrank_ext import (
    AutoLoraConfig,
    HeteroLoraConfig,
    PriLoraConfig,
    RLoraConfig,
    export_lora,
    heterolora_allocation,
)

METHODS = ("rlora", "autolora", "prilora", "heterolora")
GATED = ("autolora", "prilora", "heterolora")
TARGETS = ["layers.0", "layers.1"]


class Stack(nn.Module):
    """Two adapted linear blocks (PRILoRA reads their depth from ``layers.N``) and an unadapted head, all biased."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(12, 16), nn.Linear(16, 10)])
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def base_model(seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    return Stack().eval()


def config(method: str, **fields):
    common = {"target_modules": TARGETS, **fields}
    if method == "rlora":
        return RLoraConfig(r=4, projection_ratio=0.5, **common)
    if method == "autolora":
        return AutoLoraConfig(r=4, **{"phase": "selected", **common})
    if method == "prilora":
        return PriLoraConfig(r_first=2, r_last=4, **{"total_steps": 10, **common})  # schedule: fractions of 10
    return HeteroLoraConfig(r=4, **{"budget": 1.0, **common})  # every candidate on: trains from the first step


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(seed))


def wrapped(method: str, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base_model(), config(method, **fields))


# ----- init_weights=False --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_init_weights_false_is_not_an_identity_adapter(method):
    x = inputs()
    with torch.no_grad():
        expected = base_model()(x)
        identity = wrapped(method)(x)
        changed = wrapped(method, init_weights=False)(x)
    torch.testing.assert_close(identity, expected)
    assert (changed - expected).abs().max() > 1e-2, "init_weights=False left the adapter a no-op"


def test_rlora_default_init_std_gives_lora_scale_and_explicit_values_are_kept():
    assert RLoraConfig(projection_ratio=0.1).init_std is None
    model = wrapped("rlora", init_weights=False)
    for name in TARGETS:
        layer = model.base_model.model.get_submodule(name)
        lora_a, lora_b = layer.lora_factors("default")
        expected = 1 / math.sqrt(3 * 4)  # std of LoRA's init_lora_weights=False B (uniform ±1/sqrt(r))
        assert 0.6 * expected < lora_b.std().item() < 1.6 * expected, (name, lora_b.std().item())
        dim, total = layer.rlr_z["default"].numel(), 4 * (layer.in_features + layer.out_features)
        assert layer.rlr_config["default"].z_init_std(dim, total) == pytest.approx(math.sqrt(total / (12 * dim)))
        assert layer.rlr_z["default"].std().item() == pytest.approx(math.sqrt(total / (12 * dim)), rel=0.4)
    zero = wrapped("rlora", init_weights=False, init_std=0.0)  # explicit 0: z starts at zero, as asked
    assert all(not p.any() for n, p in zero.named_parameters() if "rlr_z" in n)
    small = wrapped("rlora", init_weights=False, init_std=1e-3)
    assert all(0 < p.abs().max() < 1e-2 for n, p in small.named_parameters() if "rlr_z" in n)
    with pytest.raises(ValueError, match=r"RLoraConfig\.init_std=-0\.5 is not allowed"):
        RLoraConfig(projection_ratio=0.1, init_std=-0.5)


# ----- bias="all" / "lora_only" ----------------------------------------------------------------------------
def _train_one_step(model) -> None:
    x = inputs(2)
    model.train()
    loss = model(x).pow(2).mean()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_is_trained_saved_reloaded_and_exported_like_lora(method, bias, tmp_path):
    model = wrapped(method, bias=bias, init_weights=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    adapted = {f"base_model.model.{t}.base_layer.bias" for t in TARGETS}
    assert trainable == (adapted | {"base_model.model.head.bias"} if bias == "all" else adapted)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    _train_one_step(model)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k for k in saved if k.endswith(".bias")} == trainable
    x = inputs()
    with torch.no_grad():
        trained = model(x)
        reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(x), trained)

    with pytest.warns(UserWarning, match=f"disabling adapter layers with bias configured to be '{bias}'"):
        with model.disable_adapter():
            pass

    lora_config = export_lora(model, tmp_path / "lora")
    assert lora_config.bias == bias
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base_model(), tmp_path / "lora").eval()
        assert type(plain.peft_config["default"]).__name__ == "LoraConfig"
        torch.testing.assert_close(plain(x), trained, atol=1e-5, rtol=1e-5)


def test_heterolora_bias_of_a_switched_off_module_is_exported_to_plain_lora(tmp_path):
    """The export omits a module with every rank off; its trained bias must still reach the plain LoRA model."""
    model = wrapped("heterolora", bias="lora_only", init_weights=False, budget=0.5, proxy="constant")
    off = [k for k, v in heterolora_allocation(model)["modules"].items() if not v["on"]]
    assert len(off) == 1
    _train_one_step(model)
    lora_config = export_lora(model, tmp_path)
    assert sorted(lora_config.target_modules) == sorted(set(TARGETS) - set(off))
    assert f"base_model.model.{off[0]}.bias" in load_file(str(tmp_path / "adapter_model.safetensors"))
    x = inputs()
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base_model(), tmp_path).eval()
        torch.testing.assert_close(plain(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_bad_bias_value_names_the_field_and_the_choices(method):
    with pytest.raises(ValueError) as info:
        config(method, bias="lora")
    message = str(info.value)
    assert "bias='lora' is not allowed" in message and "'none', 'all', 'lora_only'" in message
    assert "\n" not in message


# ----- add_weighted_adapter --------------------------------------------------------------------------------
def _two_distinct_adapters(method: str):
    """default and other: non-trivial, with each method's gates in a non-trivial state."""
    fields = {"init_weights": False}
    if method == "heterolora":  # one of the two candidates on, a different one per adapter
        first = dict(fields, budget=0.5, proxy="constant", seed=0)
        second = dict(fields, budget=0.5, proxy="constant")
        on_first = None
        for seed in range(1, 50):
            second["seed"] = seed
            probe = wrapped(method, **first)
            probe.add_adapter("other", config(method, **second))
            on = {a: tuple(v["on"] for v in heterolora_allocation(probe, a)["modules"].values())
                  for a in ("default", "other")}
            if on["default"] != on["other"]:
                on_first = on
                break
        assert on_first is not None
        return probe
    model = wrapped(method, **fields)
    model.add_adapter("other", config(method, **fields))
    with torch.no_grad():
        for module in model.modules():
            store = getattr(module, "autolr_beta", None)
            if store is not None:  # AutoLoRA: non-uniform α = softmax(β)
                for adapter in store:
                    store[adapter].normal_()
            masks = getattr(module, "prilr_element_mask", None)
            if masks is not None:  # PRILoRA: pruned entries of A
                for adapter in masks:
                    masks[adapter].bernoulli_(0.6)
            rank_mask = getattr(module, "prilr_rank_mask", None)
            if rank_mask is not None:
                rank_mask["other"][0] = 0.0  # one rank of one adapter switched off
    return model


def _expected_output(model, weights: dict[str, float], x: torch.Tensor) -> torch.Tensor:
    """The base model with W + Σ w_i ΔW_i written into its layers (computed from each adapter's own ΔW)."""
    reference = base_model()
    with torch.no_grad():
        for name in TARGETS:
            layer = model.base_model.model.get_submodule(name)
            delta = sum(w * layer.get_delta_weight(a) for a, w in weights.items())
            reference.get_submodule(name).weight += delta
        return reference(x)


@pytest.mark.parametrize("method", GATED)
def test_add_weighted_adapter_is_exact_saved_and_exported(method, tmp_path):
    model = _two_distinct_adapters(method).eval()
    weights = {"default": 0.6, "other": -1.5}
    model.add_weighted_adapter(list(weights), list(weights.values()), "mix")
    assert model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".default" in n)
    for name in TARGETS:
        layer = model.base_model.model.get_submodule(name)
        expected = sum(w * layer.get_delta_weight(a) for a, w in weights.items())
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, atol=1e-6, rtol=1e-5)

    x = inputs()
    model.set_adapter("mix")
    with torch.no_grad():
        combined = model(x)
    torch.testing.assert_close(combined, _expected_output(model, weights, x), atol=1e-5, rtol=1e-5)
    assert any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)

    model.save_pretrained(tmp_path / "saved", selected_adapters=["mix"])
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(base_model(), tmp_path / "saved" / "mix").eval()
        torch.testing.assert_close(reloaded(x), combined, atol=1e-6, rtol=1e-6)
        export_lora(model, tmp_path / "lora", "mix")
        plain = PeftModel.from_pretrained(base_model(), tmp_path / "lora").eval()
        torch.testing.assert_close(plain(x), combined, atol=1e-5, rtol=1e-5)


def test_heterolora_combination_keeps_off_only_what_every_adapter_switched_off():
    model = _two_distinct_adapters("heterolora")
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    report = heterolora_allocation(model, "mix")
    assert all(v["on"] for v in report["modules"].values())  # each module was on in one of the two
    model.add_weighted_adapter(["default"], [2.0], "only_default")
    on_default = {k: v["on"] for k, v in heterolora_allocation(model, "default")["modules"].items()}
    report = heterolora_allocation(model, "only_default")
    assert {k: v["on"] for k, v in report["modules"].items()} == on_default
    assert report["history"][-1]["on"] == [k for k, on in on_default.items() if on]


@pytest.mark.parametrize("method", GATED)
def test_add_weighted_adapter_copies_the_one_trained_modules_to_save(method):
    model = wrapped(method, init_weights=False, modules_to_save=["head"])
    model.add_adapter("other", config(method, init_weights=False))
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)
    model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    copies = model.base_model.model.head.modules_to_save
    torch.testing.assert_close(copies["mix"].weight, copies["default"].weight)
    model.add_adapter("third", config(method, modules_to_save=["head"]))
    with pytest.raises(ValueError, match="all train a copy of the same modules_to_save module"):
        model.add_weighted_adapter(["default", "third"], [1.0, 1.0], "mix2")
    assert "mix2" not in model.peft_config


@pytest.mark.parametrize("method", GATED)
@pytest.mark.parametrize("call, match", [
    (dict(adapters=["default", "other"], weights=[1.0, 1.0], adapter_name="m", combination_type="svd"),
     r"combination_type='svd' is not allowed; it must be one of 'cat'"),
    (dict(adapters=["default", "other"], weights=[1.0], adapter_name="m"), r"weights=\[1\.0\] is not allowed"),
    (dict(adapters=["default", "other"], weights=[1.0, float("nan")], adapter_name="m"), r"weights=.* finite"),
    (dict(adapters=["default", "nope"], weights=[1.0, 1.0], adapter_name="m"), r"'nope' is not an adapter"),
    (dict(adapters=[], weights=[], adapter_name="m"), r"adapters=\[\] is not allowed"),
    (dict(adapters=["default"], weights=[1.0], adapter_name="other"), r"adapter_name='other' is not allowed"),
    (dict(adapters=["default"], weights=[1.0], adapter_name="m", svd_rank=4), r"svd_rank=4 is not allowed"),
])
def test_add_weighted_adapter_bad_input_is_one_clear_line(method, call, match):
    model = wrapped(method)
    model.add_adapter("other", config(method))
    names = sorted(model.peft_config)
    with pytest.raises(ValueError, match=match) as info:
        model.add_weighted_adapter(**call)
    assert "\n" not in str(info.value) and "add_weighted_adapter" in str(info.value)
    assert sorted(model.peft_config) == names


def test_rlora_refuses_add_weighted_adapter_naming_the_way_out():
    model = wrapped("rlora")
    model.add_adapter("other", config("rlora"))
    with pytest.raises(NotImplementedError, match=r"RLoRA does not support add_weighted_adapter.*export_lora") as info:
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix")
    assert "\n" not in str(info.value)
    assert sorted(model.peft_config) == ["default", "other"]


# ----- HeteroLoRA: nothing non-finite is saved ------------------------------------------------------------------
def _scoring_model(**fields):
    """Half the candidates, scored by gradient norm over 2 batches (no allocation yet)."""
    return wrapped("heterolora", **{"init_weights": False, "budget": 0.5, "proxy": "grad_norm", "proxy_batches": 2,
                                    **fields})


def _nonfinite(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def test_heterolora_state_is_finite_before_the_first_allocation_and_round_trips_exactly(tmp_path):
    model = _scoring_model()
    report = heterolora_allocation(model)
    assert report["allocations"] == 0 and all(math.isnan(v["score"]) for v in report["modules"].values())
    state = get_peft_model_state_dict(model)
    assert any("hetlr_proxy_last" in k for k in state) and not _nonfinite(state)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base_model(), tmp_path)
    again = get_peft_model_state_dict(reloaded)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)  # NaN != NaN
    assert all(math.isnan(v["score"]) for v in heterolora_allocation(reloaded)["modules"].values())


def test_heterolora_nan_gradient_in_the_scoring_window_saves_finite_scores():
    model = _scoring_model(timing="window")  # the 2-step scoring window (the default "authors" has none)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for step in range(2):
        loss = model(inputs(step)).pow(2).mean()
        (loss * float("nan") if step == 0 else loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert not _nonfinite(get_peft_model_state_dict(model)), f"step {step}"
    report = heterolora_allocation(model)
    assert report["timing"] == "window"
    assert report["allocations"] == 1 and report["switched_on"] == 1
    assert all(math.isfinite(v["score"]) for v in report["modules"].values())
    assert all(math.isfinite(s) for entry in report["history"] for s in entry["scores"].values())


def test_heterolora_loads_an_older_file_with_the_nan_sentinel(tmp_path):
    _scoring_model().save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    keys = [k for k in tensors if "hetlr_proxy_last" in k]
    assert keys
    for key in keys:  # what versions before this fix wrote
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})

    model = PeftModel.from_pretrained(base_model(), tmp_path)
    assert not _nonfinite(get_peft_model_state_dict(model))
    report = heterolora_allocation(model)
    assert report["allocations"] == 0 and all(math.isnan(v["score"]) for v in report["modules"].values())
    model.save_pretrained(tmp_path / "resaved")
    assert not _nonfinite(load_file(str(tmp_path / "resaved" / "adapter_model.safetensors")))


# ----- autocast_adapter_dtype --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(method):
    base = base_model().to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), config(method), autocast_adapter_dtype=False)
        upcast = get_peft_model(copy.deepcopy(base), config(method))
    prefix = model.base_model.prefix
    params = [p for n, p in model.named_parameters() if prefix in n]
    assert params and all(p.dtype == torch.bfloat16 for p in params)
    assert all(p.dtype == torch.float32 for n, p in upcast.named_parameters() if prefix in n)
    assert all(b.dtype in (torch.float32, torch.int64) for n, b in model.named_buffers() if prefix in n)
    with torch.no_grad():
        out = model(inputs().to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
