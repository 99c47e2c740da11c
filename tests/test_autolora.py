"""AutoLoRA specifics: the bi-level β step in every loop, selection, retrain config and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import peft_lowrank_ext
from peft_lowrank_ext import (
    AutoLoraConfig,
    AutoLoraSearch,
    autolora_ranks,
    autolora_select,
    retrain_lora_config,
    run_autolora,
)
from peft_lowrank_ext.cli.adapter_info import describe_adapter
from peft_lowrank_ext.tuners.autolora.layer import AutoLoraLayer
from methods import lm_batches
from models import TINY_MODELS
from trainer_utils import lm_dataset, make_tokenizer, text_dataset

LLAMA = TINY_MODELS["llama"]


def make(hypergradient="first_order", base=None, **kw):
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_weights": False, "task_type": "CAUSAL_LM",
          "hypergradient": hypergradient, **kw}
    return get_peft_model(base or LLAMA.build(), AutoLoraConfig(**kw))


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AutoLoraLayer)]


def betas(model):
    return {n: m._store("beta")["default"].clone() for n, m in layers(model)}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(r=0), "r"),
        (dict(held_out_fraction=0.0), "held_out_fraction"),
        (dict(held_out_fraction=1.0), "held_out_fraction"),
        (dict(hypergradient="third_order"), "hypergradient"),
        (dict(search_every=0), "search_every"),
        (dict(retrain_dropout=1.0), "retrain_dropout"),
        (dict(arch_lr=0.0), "arch_lr"),
        (dict(arch_beta1=1.0), "arch_beta1"),
        (dict(fd_epsilon=0.0), "fd_epsilon"),
        (dict(phase="retrain"), "phase"),
        (dict(selection_rule="mean"), "selection_rule"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AutoLoraConfig(**kwargs)


def test_bad_held_out_and_missing_targets():
    with pytest.raises(ValueError, match="empty"):
        AutoLoraSearch([])
    with pytest.raises(ValueError, match="batch_size"):
        AutoLoraSearch(lm_batches(), batch_size=0)
    with pytest.raises(ValueError, match="nothing_here"):
        get_peft_model(LLAMA.build(), AutoLoraConfig(target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="no AutoLoRA layers"):
        AutoLoraSearch(lm_batches()).attach(LLAMA.build())


def test_search_without_held_out_data_fails_on_first_step():
    model = make()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = LLAMA.inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with pytest.raises(RuntimeError, match="without held-out data.*AutoLoraSearch"):
        opt.step()


def test_first_order_step_is_adam_on_the_validation_gradient():
    model = make("first_order", arch_lr=1e-2)
    val = lm_batches(1)
    AutoLoraSearch(val).attach(model)
    # The expected hypergradient: ∇β of the validation loss at the current weights.
    leaves = {}
    for name, module in layers(model):
        leaves[name] = module._store("beta")["default"].clone().requires_grad_(True)
        module._store("beta")["default"] = leaves[name]
    model.train()
    loss = model(**val[0]).loss
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for name, module in layers(model):
        module._store("beta")["default"] = leaves[name].detach()
    before = betas(model)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    inputs = LLAMA.inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    opt.step()
    after = betas(model)
    for name, g in expected.items():
        # First Adam step with bias correction: Δβ = −lr · g / (|g| + eps).
        want = before[name] - 1e-2 * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after[name], want, atol=1e-6, rtol=1e-4)
        assert not torch.equal(after[name], before[name])
    assert not any(n.endswith("beta") for n, p in model.named_parameters()), "β is not the user's optimizer's"


def _plain_masked_lowrank(x, a, b, gate, scale, mask=None, *, base=None, kernel=None):
    """The gated product in plain autograd ops (twice differentiable), for the exact reference."""
    a = a if mask is None else a * mask
    y = scale * ((x @ a.t()) * gate) @ b.t()
    return y if base is None else base + y.to(base.dtype)


def test_darts_virtual_sgd_matches_the_exact_unrolled_hypergradient(monkeypatch):
    """DARTS' finite difference ≈ d/dβ L_val(w − ξ ∇_w L_train(w, β), β), computed here exactly."""
    import peft_lowrank_ext.tuners.gated.layer as gated_layer

    xi = 0.5
    base = LLAMA.build()
    base.set_attn_implementation("eager")  # twice-differentiable attention for the exact reference
    model = make("darts_virtual_sgd", base=base, virtual_lr=xi)
    model.train()
    val = lm_batches(1)
    train = {k: v for k, v in lm_batches(1)[0].items()}
    train["input_ids"] = torch.flip(train["input_ids"], dims=[1])
    train["labels"] = train["input_ids"].clone()

    named = layers(model)
    weight_names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = [dict(model.named_parameters())[n] for n in weight_names]
    leaves = [m._store("beta")["default"].clone().requires_grad_(True) for _, m in named]
    originals = [m._store("beta")["default"] for _, m in named]
    for (_, m), leaf in zip(named, leaves):
        m._store("beta")["default"] = leaf
    monkeypatch.setattr(gated_layer, "masked_lowrank", _plain_masked_lowrank)
    # Exact: L_val at w' = w − ξ ∇_w L_train(w, β), with w' depending on β through the train gradient.
    train_grads = torch.autograd.grad(model(**train).loss, weights, create_graph=True)
    looked_ahead = {n: w - xi * g for n, w, g in zip(weight_names, weights, train_grads)}
    val_loss = torch.func.functional_call(model, looked_ahead, args=(), kwargs=val[0]).loss
    exact = torch.autograd.grad(val_loss, leaves)
    for (_, m), orig in zip(named, originals):
        m._store("beta")["default"] = orig
    monkeypatch.undo()

    import peft_lowrank_ext.tuners.autolora.search as search_mod

    recorded = {}
    monkeypatch.setattr(search_mod, "_adam_update",
                        lambda layer, adapter, grad, config: recorded.__setitem__(id(layer), grad.clone()))
    AutoLoraSearch(val).attach(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=xi)
    for p in model.parameters():
        p.grad = None
    model(**train).loss.backward()
    opt.step()
    got = torch.cat([recorded[id(m)] for _, m in named])
    want = torch.cat(exact)
    assert want.abs().max() > 1e-4
    # Finite differences with ε = 0.01/‖v‖ approximate the Hessian-vector product to O(ε²).
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=2e-2)


def _twice_differentiable(monkeypatch):
    import peft_lowrank_ext.tuners.gated.layer as gated_layer

    monkeypatch.setattr(gated_layer, "masked_lowrank", _plain_masked_lowrank)


def _record_beta_gradients(monkeypatch) -> dict:
    import peft_lowrank_ext.tuners.autolora.search as search_mod

    recorded = {}
    monkeypatch.setattr(search_mod, "_adam_update",
                        lambda layer, adapter, grad, config: recorded.__setitem__(id(layer), grad.clone()))
    return recorded


@pytest.mark.parametrize("fused", [False, True])
def test_darts_real_step_matches_betty_darts_at_the_real_look_ahead(monkeypatch, fused):
    """The authors' form: w' = the optimizer's real step; g_β = ∇_β L_val(w') − H_βw(L_train, w') v exactly."""
    base = LLAMA.build()
    base.set_attn_implementation("eager")
    model = make("darts_real_step", base=base)
    model.train()
    val = lm_batches(1)
    train = dict(lm_batches(1)[0])
    train["input_ids"] = torch.flip(train["input_ids"], dims=[1])
    train["labels"] = train["input_ids"].clone()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    weights = [params[n] for n in names]
    start = [w.detach().clone() for w in weights]
    named = layers(model)
    _twice_differentiable(monkeypatch)

    # Reference: the same optimizer on a copy of the weights and the same training gradient gives w'.
    grads = torch.autograd.grad(model(**train).loss, weights)
    twins = [w.detach().clone().requires_grad_(True) for w in weights]
    for t, g in zip(twins, grads):
        t.grad = g.clone()
    torch.optim.AdamW(twins, lr=1e-2, fused=fused).step()
    ahead = {n: t.detach() for n, t in zip(names, twins)}
    leaves = [m._store("beta")["default"].clone().requires_grad_(True) for _, m in named]
    originals = [m._store("beta")["default"] for _, m in named]
    for (_, m), leaf in zip(named, leaves):
        m._store("beta")["default"] = leaf
    at = {n: w.clone().requires_grad_(True) for n, w in ahead.items()}
    val_loss = torch.func.functional_call(model, at, args=(), kwargs=val[0]).loss
    direct_and_v = torch.autograd.grad(val_loss, leaves + list(at.values()))
    direct, v = direct_and_v[: len(leaves)], direct_and_v[len(leaves):]
    train_loss = torch.func.functional_call(model, at, args=(), kwargs=train).loss
    g_w = torch.autograd.grad(train_loss, list(at.values()), create_graph=True)
    hvp = torch.autograd.grad(sum((g * d).sum() for g, d in zip(g_w, v)), leaves)
    want = torch.cat([d - h for d, h in zip(direct, hvp)])
    implicit = torch.cat(hvp)
    for (_, m), orig in zip(named, originals):
        m._store("beta")["default"] = orig

    recorded = _record_beta_gradients(monkeypatch)
    AutoLoraSearch(val).attach(model)
    opt = torch.optim.AdamW(weights, lr=1e-2, fused=fused)
    for p in model.parameters():
        p.grad = None
    model(**train).loss.backward()
    opt.step()
    got = torch.cat([recorded[id(m)] for _, m in named])
    assert implicit.abs().max() > 0.05 * want.abs().max(), "the implicit term matters at this size"
    torch.testing.assert_close(got, want, atol=2e-3 * want.abs().max().item(), rtol=2e-2)
    # The look-ahead was undone: the loop's own step moved the weights exactly once, as the reference did.
    for n, w in zip(names, weights):
        torch.testing.assert_close(w.detach(), ahead[n], atol=0, rtol=0)
    assert all(int(opt.state[w]["step"]) == 1 for w in weights)
    assert any(not torch.equal(w.detach(), s) for w, s in zip(weights, start))


def test_darts_real_step_leaves_optimizer_state_as_a_run_without_search():
    """Over several steps with a stateful optimizer, A/B follow exactly the run whose β never moves."""
    torch.manual_seed(0)
    searched = make("darts_real_step")
    plain = make("darts_real_step", phase="selected")
    plain.load_state_dict(searched.state_dict())
    AutoLoraSearch(lm_batches()).attach(searched)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
            for m in (searched, plain)]
    for step in range(3):
        for (_, a), (_, b) in zip(layers(searched), layers(plain)):  # the same β: the same training gradient
            b._store("beta")["default"].copy_(a._store("beta")["default"])
        batch = lm_batches(1, seq=6)[0]
        for model, opt in zip((searched, plain), opts):
            model.train()
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        ab = [{n: p.detach() for n, p in m.named_parameters() if p.requires_grad} for m in (searched, plain)]
        for n in ab[0]:
            torch.testing.assert_close(ab[0][n], ab[1][n], atol=1e-6, rtol=1e-5)
    assert int(layers(searched)[0][1]._store("beta_step")["default"]) == 3
    assert int(layers(plain)[0][1]._store("beta_step")["default"]) == 0


def test_search_every_k_steps_moves_beta_on_steps_0_k_2k(monkeypatch):
    model = make("first_order", search_every=3)
    AutoLoraSearch(lm_batches()).attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    moved = []
    for step in range(7):
        before = betas(model)
        model(**lm_batches(1, seq=6)[0]).loss.backward()
        opt.step()
        opt.zero_grad()
        moved.append(any(not torch.equal(before[n], b) for n, b in betas(model).items()))
    assert moved == [True, False, False, True, False, False, True]


def test_old_hypergradient_name_reads_as_darts_virtual_sgd():
    with pytest.warns(FutureWarning, match="second_order.*darts_virtual_sgd"):
        config = AutoLoraConfig(hypergradient="second_order")
    assert config.hypergradient == "darts_virtual_sgd"


def test_authors_defaults_alpha_16_retrain_dropout_and_frozen_head_in_search():
    config = AutoLoraConfig(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    assert (config.lora_alpha, config.retrain_dropout, config.hypergradient) == (16.0, 0.1, "first_order")
    model = get_peft_model(LLAMA.build(), AutoLoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    autolora_select(model)
    assert retrain_lora_config(model).lora_dropout == 0.1
    from peft_lowrank_ext.tuners.autolora.selection import freeze_modules_to_save

    assert freeze_modules_to_save(model) > 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("autolr_" in n for n in trainable)


@pytest.mark.parametrize("loop", ["plain", "trainer", "sft"])
def test_beta_learns_in_every_loop(loop, tmp_path):
    if loop == "plain":
        model = make("darts_real_step")
        before = betas(model)
        AutoLoraSearch(lm_batches()).attach(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        for step in range(2):
            batch = lm_batches(1, seq=6)[0]
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        args = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                    use_cpu=True, save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0)
        config = AutoLoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        if loop == "trainer":
            model = get_peft_model(LLAMA.build(), config)
            before = betas(model)
            Trainer(model=model, args=TrainingArguments(**args), train_dataset=lm_dataset(),
                    callbacks=[AutoLoraSearch(lm_batches())]).train()
        else:
            trainer = SFTTrainer(model=LLAMA.build(), args=SFTConfig(**args, max_length=16),
                                 train_dataset=text_dataset(), processing_class=make_tokenizer(), peft_config=config,
                                 callbacks=[AutoLoraSearch(lm_batches())])
            model = trainer.model
            before = betas(model)
            trainer.train()
    after = betas(model)
    assert all(not torch.equal(before[n], after[n]) for n in before), "β must move during the search"


def test_selection_ranks_export_and_retrain_config(tmp_path):
    model = make()
    targets = {n: m for n, m in layers(model)}
    wanted = {}
    for i, (name, module) in enumerate(targets.items()):
        beta = torch.full((4,), -5.0)
        beta[: i % 4 + 1] = 1.0  # i%4+1 components share the mass, the rest ~0
        module._store("beta")["default"].copy_(beta)
        wanted[name.removeprefix("base_model.model.")] = i % 4 + 1
    assert autolora_ranks(model) == wanted
    inputs = LLAMA.inputs()
    ranks = autolora_select(model)
    assert ranks == wanted and model.peft_config["default"].phase == "selected"
    selected_out = model(**inputs).logits.detach()

    # Export of the selected adapter is exact and has the selected per-module ranks.
    lora_cfg = peft_lowrank_ext.export_lora(model, tmp_path / "lora", layout="compact")
    reloaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, selected_out, atol=1e-5, rtol=1e-5)
    shapes = {n: m.lora_A["default"].weight.shape[0] for n, m in reloaded.named_modules() if hasattr(m, "lora_A")
              and "default" in m.lora_A}
    assert {n.removeprefix("base_model.model."): r for n, r in shapes.items()} == wanted
    assert isinstance(lora_cfg, LoraConfig)

    retrain = retrain_lora_config(model)
    fresh = get_peft_model(LLAMA.build(), retrain)
    got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in fresh.named_modules()
           if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert got == wanted
    assert all(abs(m.scaling["default"] - retrain.lora_alpha / m.r["default"]) < 1e-12
               for m in fresh.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict) and m.scaling)


def test_every_module_keeps_at_least_one_component():
    model = make()
    ranks = autolora_select(model, threshold=1.0)  # uniform α = 1/4 < 1 everywhere
    assert set(ranks.values()) == {1}


def test_run_autolora_one_call(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_num_workers=0)
    config = AutoLoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                            hypergradient="first_order", held_out_fraction=0.25)
    lora_model, ranks = run_autolora(LLAMA.build, config, lm_dataset(16), args)
    assert len(ranks) == 4 and all(1 <= r <= 4 for r in ranks.values())
    got = {n.removeprefix("base_model.model."): m.r["default"] for n, m in lora_model.named_modules()
           if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert got == ranks


# --- selection rules: softmax(β) (lora_glue.py) or β / Σβ on raw β initialised to ones (run_glue_search.py) ---

def test_selection_rule_is_checked_naming_field_value_and_choices():
    with pytest.raises(ValueError) as error:
        AutoLoraConfig(selection_rule="mean")
    message = str(error.value)
    assert "selection_rule='mean'" in message and "'softmax', 'normalized'" in message
    assert AutoLoraConfig().selection_rule == "softmax"


def test_selection_rule_is_saved_and_old_configs_load_with_the_default(tmp_path):
    AutoLoraConfig(selection_rule="normalized").save_pretrained(tmp_path / "new")
    assert AutoLoraConfig.from_pretrained(tmp_path / "new").selection_rule == "normalized"
    AutoLoraConfig().save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["selection_rule"]  # written before the field existed
    path.write_text(json.dumps(saved))
    assert AutoLoraConfig.from_pretrained(tmp_path / "old").selection_rule == "softmax"


def _hand_kept(scores, threshold):
    kept = [1.0 if s >= threshold else 0.0 for s in scores]
    if not any(kept):
        kept[max(range(len(scores)), key=scores.__getitem__)] = 1.0
    return kept


@pytest.mark.parametrize(
    "beta, softmax_rank, normalized_rank",
    [
        ([2.0, 1.0, 0.5, 0.5], 1, 2),  # the rules disagree: mean β = 1 keeps two, softmax(β) ≥ 1/4 only one
        ([3.0, 0.5, 0.25, 0.25], 1, 1),
        ([1.0, 1.0, 1.0, 1.0], 4, 4),  # as initialised: both keep everything
        ([1.5, 1.2, 0.9, 0.4], 2, 2),
    ],
)
def test_both_rules_match_a_hand_computation(beta, softmax_rank, normalized_rank):
    r = len(beta)
    exps = [math.exp(b) for b in beta]
    by_softmax = _hand_kept([e / sum(exps) for e in exps], 1.0 / r)
    by_normalized = _hand_kept([b / sum(beta) for b in beta], 1.0 / r)
    assert (sum(by_softmax), sum(by_normalized)) == (softmax_rank, normalized_rank)
    for rule, want in (("softmax", by_softmax), ("normalized", by_normalized)):
        model = make(selection_rule=rule)
        for _, module in layers(model):
            module._store("beta")["default"].copy_(torch.tensor(beta))
            assert module.kept_components("default", 1.0 / r).tolist() == want
        assert set(autolora_ranks(model).values()) == {int(sum(want))}
        assert set(autolora_select(model).values()) == {int(sum(want))}
        assert all(m._store("rank_mask")["default"].tolist() == want for _, m in layers(model))


def test_threshold_override_applies_to_the_normalized_rule():
    model = make(selection_rule="normalized")
    for _, module in layers(model):
        module._store("beta")["default"].copy_(torch.tensor([2.0, 1.0, 0.5, 0.5]))  # β/Σβ = .5, .25, .125, .125
    assert set(autolora_ranks(model, threshold=0.1).values()) == {4}
    assert set(autolora_ranks(model, threshold=0.3).values()) == {1}


def test_normalized_rule_refuses_nonpositive_beta_sum_naming_the_module():
    model = make(selection_rule="normalized")
    name, first = layers(model)[0]
    first._store("beta")["default"].copy_(torch.tensor([-1.0, 0.5, 0.25, 0.0]))  # Σβ = -0.25
    short = name.removeprefix("base_model.model.")
    with pytest.raises(ValueError, match=f"{short}.*Σβ > 0"):
        autolora_ranks(model)
    with pytest.raises(ValueError, match=short):
        autolora_select(model)
    # nothing was half-selected
    assert model.peft_config["default"].phase == "search"
    assert all(m._store("rank_mask")["default"].sum() == 4 for _, m in layers(model))


def test_saved_adapter_reports_the_ranks_of_its_rule(tmp_path):
    model = make(selection_rule="normalized")
    for _, module in layers(model):
        module._store("beta")["default"].copy_(torch.tensor([2.0, 1.0, 0.5, 0.5]))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    assert reloaded.peft_config["default"].selection_rule == "normalized"
    assert autolora_ranks(reloaded) == autolora_ranks(model)
    assert set(autolora_ranks(model).values()) == {2}
    info = describe_adapter(tmp_path)
    assert {n: f["rank"] for n, f in info.modules.items()} == autolora_ranks(model)


def test_ones_initialisation_changes_neither_outputs_nor_beta_gradient_nor_adam_step():
    # Two identical models (not a deepcopy: a copied model's search step hook still reaches the original's β).
    torch.manual_seed(0)
    ones = make(arch_lr=1e-2)
    assert all(torch.equal(m._store("beta")["default"], torch.ones(4)) for _, m in layers(ones))
    torch.manual_seed(0)
    zeros = make(arch_lr=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(ones.state_dict().values(), zeros.state_dict().values()))
    for _, module in layers(zeros):
        module._store("beta")["default"].zero_()
    inputs = LLAMA.inputs()

    def output_and_beta_grad(model):
        named = layers(model)
        leaves = [m._store("beta")["default"].clone().requires_grad_(True) for _, m in named]
        originals = [m._store("beta")["default"] for _, m in named]
        for (_, m), leaf in zip(named, leaves):
            m._store("beta")["default"] = leaf
        gates = [m.soft_gate("default").detach() for _, m in named]
        out = model(**inputs, labels=inputs["input_ids"])
        grads = torch.autograd.grad(out.loss, leaves)
        for (_, m), orig in zip(named, originals):
            m._store("beta")["default"] = orig
        return gates, out.logits.detach(), grads

    model_outputs = [output_and_beta_grad(m) for m in (ones, zeros)]
    (gates_1, logits_1, grads_1), (gates_0, logits_0, grads_0) = model_outputs
    for a, b in zip(gates_1, gates_0):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, torch.full((4,), 0.25))
    torch.testing.assert_close(logits_1, logits_0, atol=0, rtol=0)
    for a, b in zip(grads_1, grads_0):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)

    # One bi-level (first-order) step each: Adam moves β by the same amount from either start.
    moves = []
    for model in (ones, zeros):
        start = betas(model)
        AutoLoraSearch(lm_batches(1)).attach(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        moves.append({n: b - start[n] for n, b in betas(model).items()})
    for n in moves[0]:
        assert moves[0][n].abs().max() > 0
        torch.testing.assert_close(moves[0][n], moves[1][n], atol=1e-6, rtol=1e-5)
