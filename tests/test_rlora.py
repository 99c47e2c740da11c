"""RLoRA specifics: config validation, the Fastfood projection, regeneration and load-time safety."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_lowrank_ext import RLoraConfig
from peft_lowrank_ext.kernels.hadamard import hadamard_matrix
from peft_lowrank_ext.tuners.rlora.layer import RLoraLayer
from peft_lowrank_ext.tuners.rlora.projection import FastfoodProjection, fastfood_project, next_power_of_two
from models import TINY_MODELS


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0, projection_ratio=0.1), "r"),
        (dict(r=-3, projection_ratio=0.1), "r"),
        (dict(r=2.5, projection_ratio=0.1), "r"),
        (dict(intrinsic_dim=0), "intrinsic_dim"),
        (dict(intrinsic_dim=-1), "intrinsic_dim"),
        (dict(projection_ratio=0.0), "projection_ratio"),
        (dict(projection_ratio=1.5), "projection_ratio"),
        (dict(projection_ratio=float("nan")), "projection_ratio"),
        (dict(intrinsic_dim=8, projection_ratio=0.1), "intrinsic_dim"),
        (dict(), "projection_ratio"),
        (dict(projection_ratio=0.1, lora_alpha=0), "lora_alpha"),
        (dict(projection_ratio=0.1, lora_dropout=1.0), "lora_dropout"),
        (dict(projection_ratio=0.1, pac_bayes_weight=-1.0), "pac_bayes_weight"),
        (dict(projection_ratio=0.1, pac_bayes_weight=1.0), "num_train_examples"),
        (dict(projection_ratio=0.1, pac_bayes_weight=1.0, num_train_examples=0), "num_train_examples"),
        (dict(projection_ratio=0.1, pac_bayes_bound="catoni"), "pac_bayes_bound"),
        (dict(projection_ratio=0.1, pac_bayes_delta=1.0), "pac_bayes_delta"),
        (dict(projection_ratio=0.1, prior_sigma=0.0), "prior_sigma"),
        (dict(projection_ratio=0.1, posterior_sigma=-0.1), "posterior_sigma"),
        (dict(projection_ratio=0.1, seed=-1), "seed"),
        (dict(projection_ratio=0.1, bias="lora"), "bias"),
        (dict(projection_ratio=0.1, target_parameters=["w"]), "target_parameters"),
        (dict(projection_ratio=0.1, init_std=-1.0), "init_std"),
        (dict(projection_ratio=0.1, projection_version=0), "projection_version"),
        (dict(projection_ratio=0.1, projection_fingerprint="0000"), "projection_fingerprint"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        RLoraConfig(**kwargs)
    assert "allowed" in str(info.value)


def test_intrinsic_dim_larger_than_module_is_refused_at_wrap_time():
    case = TINY_MODELS["llama"]
    # q_proj is 32x32 at r=2: D = 2*(32+32) = 128
    config = RLoraConfig(r=2, intrinsic_dim=129, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"intrinsic_dim=129.*q_proj.*\[1, D\]"):
        get_peft_model(case.build(), config)


def test_unsupported_layer_type_and_missing_targets_are_refused():
    case = TINY_MODELS["gpt2"]
    with pytest.raises(ValueError, match="Embedding.*only torch.nn.Linear and transformers' Conv1D"):
        get_peft_model(case.build(), RLoraConfig(projection_ratio=0.1, target_modules=["wte"]))
    with pytest.raises(ValueError, match="not_a_module"):
        get_peft_model(case.build(), RLoraConfig(projection_ratio=0.1, target_modules=["not_a_module"]))


def dense_fastfood(z, signs, perm, gauss, out_dim):
    """The projection written as explicit matrices in float64: the reference for fastfood_project."""
    length = signs.numel()
    h = hadamard_matrix(length, torch.float64)
    pi = torch.zeros(length, length, dtype=torch.float64)
    pi[torch.arange(length), perm] = 1.0
    p_full = h @ torch.diag(gauss.double()) @ pi @ h @ torch.diag(signs.double())
    p = p_full[:out_dim, : z.numel()] / (gauss.double().norm() * math.sqrt(out_dim))
    return p @ z.double(), p


@pytest.mark.parametrize("d, out_dim", [(5, 40), (16, 64), (33, 100)])
def test_fastfood_matches_dense_matrix_and_its_transpose(d, out_dim):
    proj = FastfoodProjection.generate(r=2, in_features=out_dim // 4, out_features=out_dim // 4, intrinsic_dim=d,
                                       seed=7, module_name="m")
    out_dim = proj.total_dim
    z = torch.randn(d, dtype=torch.float32, requires_grad=True)
    got = fastfood_project(z[None], proj.signs[None], proj.perm[None], proj.gauss[None], out_dim)[0]
    want, p = dense_fastfood(z.detach(), proj.signs, proj.perm, proj.gauss, out_dim)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    v = torch.randn(out_dim)
    (grad,) = torch.autograd.grad(got, z, v)
    torch.testing.assert_close(grad.double(), p.t() @ v.double(), atol=1e-5, rtol=1e-5)
    assert proj.signs.numel() == next_power_of_two(max(out_dim, d))


def test_projection_roughly_preserves_norm():
    proj = FastfoodProjection.generate(r=8, in_features=256, out_features=256, intrinsic_dim=512, seed=0,
                                       module_name="x")
    z = torch.randn(512)
    out = fastfood_project(z[None], proj.signs[None], proj.perm[None], proj.gauss[None], proj.total_dim)[0]
    assert 0.5 < out.norm() / z.norm() < 2.0


def test_randomness_is_regenerated_from_seed_and_module_name():
    make = lambda seed, name: FastfoodProjection.generate(r=2, in_features=8, out_features=6, intrinsic_dim=4,
                                                          seed=seed, module_name=name)
    a, b, c, d = make(0, "x.q"), make(0, "x.q"), make(0, "x.k"), make(1, "x.q")
    for name in ("signs", "perm", "gauss", "lora_a_init"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
        assert not torch.equal(getattr(a, name), getattr(d, name))
    bound = 1 / math.sqrt(8)
    assert a.lora_a_init.abs().max() <= bound
    assert set(a.signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(a.perm.sort().values, torch.arange(a.perm.numel()))


def test_fresh_adapter_is_a_no_op_and_only_z_is_saved(tmp_path):
    case = TINY_MODELS["gpt2"]
    inputs = case.inputs()
    base = case.build()
    with torch.no_grad():
        expected = base(**inputs).logits
    config = RLoraConfig(r=4, projection_ratio=0.1, target_modules=["c_attn"])
    model = get_peft_model(base, config)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    d_in, d_out = 32, 96  # c_attn of the tiny GPT-2
    assert len(saved) == 2
    for key, tensor in saved.items():
        assert key.endswith("rlr_z") and tensor.shape == (math.ceil(0.1 * 4 * (d_in + d_out)),)


def test_learnable_scale_and_sigma_are_saved_as_one_element_vectors(tmp_path):
    case = TINY_MODELS["llama"]
    config = RLoraConfig(r=2, intrinsic_dim=16, target_modules=["q_proj"], learnable_scale=True,
                         learn_posterior_sigma=True)
    model = get_peft_model(case.build(), config)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    shapes = sorted((k.rsplit(".", 1)[-1], tuple(v.shape)) for k, v in saved.items())
    assert shapes == [("rlr_log_sigma", (1,))] * 2 + [("rlr_scale", (1,))] * 2 + [("rlr_z", (16,))] * 2


def test_adapter_saved_with_scalar_scale_and_sigma_still_loads(tmp_path):
    """Earlier versions saved the learned scale and log σ_q as 0-d tensors (FSDP2 / ZeRO refuse those)."""
    case = TINY_MODELS["llama"]
    config = RLoraConfig(r=2, intrinsic_dim=16, target_modules=["q_proj"], learnable_scale=True,
                         learn_posterior_sigma=True, init_weights=False)
    model = get_peft_model(case.build(), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "rlr_scale" in name or "rlr_log_sigma" in name:
                param.fill_(0.7)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: (v.reshape(()) if v.numel() == 1 else v) for k, v in load_file(path).items()}, path)
    assert any(v.dim() == 0 for v in load_file(path).values())
    loaded = PeftModel.from_pretrained(case.build(), tmp_path)
    ids = torch.randint(0, 32, (2, 5))
    model.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_loading_adapter_of_other_projection_version_fails_clearly(tmp_path):
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), RLoraConfig(r=2, intrinsic_dim=8, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["projection_version"] == 1 and len(saved["projection_fingerprint"]) == 16

    path.write_text(json.dumps({**saved, "projection_version": 99}))
    with pytest.raises(ValueError, match="projection_version=99.*different weights"):
        PeftModel.from_pretrained(case.build(), tmp_path)
    path.write_text(json.dumps({**saved, "projection_fingerprint": "deadbeefdeadbeef"}))
    with pytest.raises(ValueError, match="projection_fingerprint='deadbeefdeadbeef'"):
        PeftModel.from_pretrained(case.build(), tmp_path)


def test_config_is_cheap_and_the_fingerprint_is_filled_in_and_checked_when_wrapping():
    case = TINY_MODELS["llama"]
    config = RLoraConfig(r=2, intrinsic_dim=8, target_modules=["q_proj"])
    assert config.projection_fingerprint is None  # building a config regenerates no projection
    get_peft_model(case.build(), config)
    assert len(config.projection_fingerprint) == 16
    wrong = RLoraConfig(r=2, intrinsic_dim=8, target_modules=["q_proj"], projection_fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="projection_fingerprint='0123456789abcdef' is not allowed"):
        get_peft_model(case.build(), wrong)


def test_generator_change_at_larger_sizes_only_is_caught_on_load(tmp_path, monkeypatch):
    from peft_lowrank_ext.tuners.rlora.projection import projection_fingerprint

    case = TINY_MODELS["llama"]
    # q_proj is 32x32 at r=2: D = 128, a Hadamard length of 128; the legacy fingerprint regenerates length 64 only.
    model = get_peft_model(case.build(), RLoraConfig(r=2, intrinsic_dim=8, target_modules=["q_proj", "v_proj"],
                                                     init_weights=False))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{16}", saved["projection_sizes_fingerprint"])
    legacy = projection_fingerprint(0)
    PeftModel.from_pretrained(case.build(), tmp_path)  # the same install loads it

    original = torch.randperm

    def changed_randperm(n, *args, **kwargs):  # a "new torch" whose permutations differ above length 64
        perm = original(n, *args, **kwargs)
        return perm.flip(0) if n > 64 else perm

    monkeypatch.setattr(torch, "randperm", changed_randperm)
    assert projection_fingerprint(0) == legacy  # the single length-64 fingerprint cannot see the change
    with pytest.raises(ValueError, match=r"RLoraConfig\.projection_sizes_fingerprint='[0-9a-f]{8}-[0-9a-f]{16}' is not allowed.*"
                                         r"different random generator at the sizes this adapter uses"):
        PeftModel.from_pretrained(case.build(), tmp_path)
    monkeypatch.undo()

    # An adapter saved before the field existed still loads (checked by the legacy fingerprint) and is filled in.
    del saved["projection_sizes_fingerprint"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    old = PeftModel.from_pretrained(case.build(), tmp_path)
    assert old.peft_config["default"].projection_sizes_fingerprint == \
        model.peft_config["default"].projection_sizes_fingerprint
    with pytest.raises(ValueError, match="projection_sizes_fingerprint='x' is not allowed"):
        RLoraConfig(projection_ratio=0.1, projection_sizes_fingerprint="x")


def test_noise_injection_only_in_training_and_sigma_learns():
    case = TINY_MODELS["llama"]
    config = RLoraConfig(r=2, intrinsic_dim=16, target_modules=["q_proj"], noise_injection=True,
                         learn_posterior_sigma=True, posterior_sigma=0.5, init_weights=False, init_std=0.1)
    model = get_peft_model(case.build(), config)
    inputs = case.inputs()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    out1 = model(**inputs, labels=inputs["input_ids"])
    with torch.no_grad():
        out2 = model(**inputs).logits
    assert not torch.allclose(out1.logits.detach(), out2)
    out1.loss.backward()
    sigmas = [m.rlr_log_sigma["default"] for m in model.modules() if isinstance(m, RLoraLayer)]
    assert sigmas and all(s.grad is not None and s.grad != 0 for s in sigmas)


def test_inference_factor_cache_follows_every_change_of_z():
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), RLoraConfig(r=2, intrinsic_dim=16, target_modules=["q_proj"],
                                                     init_weights=False, init_std=0.3)).eval()
    inputs = case.inputs()

    def fresh():
        with torch.enable_grad():
            return model(**inputs).logits.detach()

    with torch.no_grad():
        first = model(**inputs).logits
        assert torch.equal(model(**inputs).logits, first)
        torch.testing.assert_close(first, fresh(), atol=1e-6, rtol=1e-6)
        z = next(p for n, p in model.named_parameters() if "rlr_z" in n)
        z.mul_(2.0)
        assert not torch.equal(model(**inputs).logits, first)
        torch.testing.assert_close(model(**inputs).logits, fresh(), atol=1e-6, rtol=1e-6)
        state = {k: v.clone() for k, v in model.state_dict().items() if "rlr_z" in k}
        for v in state.values():
            v.zero_()
        model.load_state_dict(state, strict=False)
        with model.disable_adapter():
            base = model(**inputs).logits
        assert torch.equal(model(**inputs).logits, base)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_projection_equals_per_layer_projection(checkpointing):
    """The forward pre-hook that projects all modules at once gives the same outputs and gradients."""
    case = TINY_MODELS["llama"]
    inputs = case.inputs()
    results = []
    for batched in (True, False):
        config = RLoraConfig(r=3, projection_ratio=0.2, target_modules=list(case.target_modules), init_weights=False,
                             init_std=0.3, batch_projection=batched, learnable_scale=True)
        model = get_peft_model(case.build(), config)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        layers = [m for m in model.modules() if isinstance(m, RLoraLayer)]
        calls = []
        for layer in layers:
            orig = layer.rlr_projection["default"].factors
            layer.rlr_projection["default"].factors = lambda *a, _o=orig, **k: calls.append(1) or _o(*a, **k)
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), grads, len(calls)))
        if batched and not checkpointing:
            assert len(calls) == 0, "the grouped path should not fall back to per-layer projections"
        if not batched:
            assert len(calls) >= len(layers)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph_over_rlora_forward_and_backward():
    case = TINY_MODELS["llama"]
    inputs = case.inputs()
    results = []
    for compiled in (False, True):
        config = RLoraConfig(r=2, projection_ratio=0.3, target_modules=["q_proj", "v_proj"], init_weights=False,
                             init_std=0.3)
        model = get_peft_model(case.build(), config).train()
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        out = run(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-6, rtol=1e-5)
