"""HeteroLoRA against the authors' definitions: SynFlow, alpha test, timing, same-footing scores, OPT
shortcuts, and the OPT GLUE recipe (--tiny). Expected values are computed independently here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from transformers import OPTConfig, OPTForCausalLM

from peft_lowrank_ext import HeteroLoraConfig, HeteroLoraData, heterolora_allocation, heterolora_score
from methods import hand_alpha_test
from test_heterolora import (LLAMA, hand_forward, hand_params, lm_batch, llama_model, scores_of, tiny,
                             tiny_batches)

ROOT = Path(__file__).resolve().parents[1]


def test_synflow_authors_back_propagates_the_loss_with_labels_from_all_ones_embeddings():
    model = tiny("synflow")
    p = hand_params(model)
    with torch.no_grad():
        for t in [p["E"]] + [v for m in ("fc1", "fc2") for k, v in p[m].items() if k != "s"]:
            t.abs_()
    expected = torch.zeros(2)
    for batch in tiny_batches():
        loss = hand_forward(p, None, batch["labels"], x=torch.ones(4, 5, 6))
        g = torch.autograd.grad(loss, [p[m][k] for m in ("fc1", "fc2") for k in ("A", "B")])
        expected += torch.stack([(p["fc1"]["A"] * g[0]).abs().sum() + (p["fc1"]["B"] * g[1]).abs().sum(),
                                 (p["fc2"]["A"] * g[2]).abs().sum() + (p["fc2"]["B"] * g[3]).abs().sum()]).detach()
    heterolora_score(model, tiny_batches())
    torch.testing.assert_close(torch.tensor(scores_of(model)), expected / 2, rtol=1e-5, atol=1e-7)


def _accuracy(p, batches, scales):
    hits = sum(int((hand_forward(p, b["input_ids"], scales=scales, layer=True).argmax(-1) == b["labels"]).sum())
               for b in batches)
    return hits / sum(len(b["labels"]) for b in batches)


def test_alpha_test_authors_scales_the_whole_layer_output_and_judges_accuracy():
    model = tiny("alpha_test", alpha_test_tolerance=0.1, proxy_batches=4)
    p = hand_params(model)
    train = tiny_batches()
    gen = torch.Generator().manual_seed(9)
    val = [{"input_ids": torch.randint(0, 11, (4, 5), generator=gen)} for _ in range(2)]
    with torch.no_grad():
        for b in train + val:  # half the labels the model's own predictions: accuracy 0.5-1 and sensitive
            pred = hand_forward(p, b["input_ids"]).argmax(-1)
            b["labels"] = torch.where(torch.arange(4) % 2 == 0, pred, torch.randint(0, 3, (4,), generator=gen))
        everything = train + val  # proxy_batches=4 covers the whole 1:1 mix, so its order does not matter
        base = _accuracy(p, everything, (1.0, 1.0))
        expected = hand_alpha_test(lambda s: _accuracy(p, everything, s) < base - base * 0.1)
    with pytest.raises(ValueError, match="validation=None is not allowed with proxy='alpha_test'"):
        heterolora_score(model, train)
    heterolora_score(model, train, validation=val)
    assert scores_of(model) == pytest.approx(expected)
    assert max(expected) > 0  # at B = 0 the authors' test is informative (the base layer is scaled too)


def test_alpha_test_authors_in_training_without_validation_data_fails_clearly():
    model = llama_model(proxy="alpha_test", timing="authors")
    model.train()
    with pytest.raises(ValueError, match=r"needs validation data: pass HeteroLoraData\(validation=\.\.\.\)"):
        model(**lm_batch(0))


def test_weight_grad_norm_scores_every_candidate_on_the_same_footing():
    """‖∇_W L‖ at the candidate's position: it does not move with the candidate's own A (B = 0), while
    grad_norm (‖∇A‖+‖∇B‖) does — the bias toward incumbents this proxy removes."""
    model = tiny("weight_grad_norm", init_weights=True)  # B = 0 everywhere
    p = hand_params(model)
    expected = torch.zeros(2)
    for batch in tiny_batches():
        loss = hand_forward(p, batch["input_ids"], batch["labels"])
        gw = torch.autograd.grad(loss, [p["fc1"]["W"], p["fc2"]["W"]])
        expected += torch.stack([gw[0].norm(), gw[1].norm()]).detach()
    heterolora_score(model, tiny_batches())
    torch.testing.assert_close(torch.tensor(scores_of(model)), expected / 2, rtol=1e-5, atol=1e-7)

    def scores(proxy, a_scale):
        m = tiny(proxy, init_weights=True)
        with torch.no_grad():
            m.base_model.model.fc1.hetlr_A["default"].mul_(a_scale)
        heterolora_score(m, tiny_batches())
        return scores_of(m)

    assert scores("weight_grad_norm", 5.0) == pytest.approx(scores("weight_grad_norm", 1.0), rel=1e-6)
    assert scores("grad_norm", 5.0)[0] == pytest.approx(5 * scores("grad_norm", 1.0)[0], rel=1e-5)


def test_authors_timing_allocates_before_the_step_and_restarts_every_epoch():
    model = llama_model(proxy="grad_norm", mode="dynamic", timing="authors", realloc_every=0.4, steps_per_epoch=5)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if "hetlr_" in n}
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-2)
    model.train()
    for step in range(10):
        model(**lm_batch(step)).loss.backward()
        if step == 0:  # allocated before step 0's forward: only the k switched-on modules have gradients
            on = {n for n, v in heterolora_allocation(model)["modules"].items() if v["on"]}
            graded = {n.split(".hetlr_")[0].removeprefix("base_model.model.") for n, q in model.named_parameters()
                      if "hetlr_" in n and q.grad is not None}
            assert graded == on and len(on) == 4
        opt.step()
        opt.zero_grad()
    report = heterolora_allocation(model)
    # ceil(0.4 · 5) = 2 steps; index within the epoch 0, 2, 4, then the next epoch restarts at 5
    assert [h["step"] for h in report["history"]] == [0, 2, 4, 5, 7, 9]
    assert report["next_allocation_before_step"] == 10
    assert any(not torch.equal(q, start[n]) for n, q in model.named_parameters() if "hetlr_" in n)


def test_authors_timing_scores_the_fixed_training_batches_of_heterolora_data():
    fixed = [lm_batch(100 + i) for i in range(3)]
    reference = llama_model(proxy="grad_norm", timing="authors", proxy_batches=3)
    expected = heterolora_score(reference, fixed)["modules"]
    model = llama_model(proxy="grad_norm", timing="authors", proxy_batches=3)
    HeteroLoraData(train=fixed).attach(model)
    model.train()
    model(**lm_batch(0)).loss.backward()  # the training batch itself is not scored
    got = heterolora_allocation(model)["modules"]
    assert {n: v["on"] for n, v in got.items()} == {n: v["on"] for n, v in expected.items()}
    assert [v["score"] for v in got.values()] == pytest.approx([v["score"] for v in expected.values()], rel=1e-5)


def test_fractional_realloc_every_without_steps_per_epoch_fails_before_training():
    model = llama_model(proxy="grad_norm", mode="dynamic", timing="authors", realloc_every=0.1)
    model.train()
    with pytest.raises(ValueError, match=r"realloc_every=0\.1 is a fraction of an epoch, which needs steps_per_epoch"):
        model(**lm_batch(0))


@pytest.mark.parametrize("config_kw", [dict(realloc_every=0.0), dict(realloc_every=2.5), dict(steps_per_epoch=0),
                                       dict(timing="later"), dict(alpha_test_metric="f1")])
def test_new_fields_refuse_bad_values_at_config_build(config_kw):
    field = next(iter(config_kw))
    with pytest.raises(ValueError, match=rf"HeteroLoraConfig\.{field}="):
        HeteroLoraConfig(**config_kw)


# ----- OPT shortcuts -----------------------------------------------------------------------------------
def tiny_opt(pre_ln: bool):
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=32,
                                    do_layer_norm_before=pre_ln, dropout=0.0, pad_token_id=1)).eval()


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post_ln_opt350m", "pre_ln"])
def test_opt_shortcuts_zero_is_exact_noop_nonzero_changes_and_round_trips(pre_ln, tmp_path):
    inputs = LLAMA.inputs()
    base = tiny_opt(pre_ln)
    with torch.no_grad():
        expected = base(**inputs).logits
    kw = dict(target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", budget=1.0, proxy="constant",
              shortcuts=["residual_1", "residual_2", "shortcut_sa", "shortcut_ffn"])
    zero = get_peft_model(tiny_opt(pre_ln), HeteroLoraConfig(**kw))  # B = 0: every shortcut is ΔS = 0
    with torch.no_grad():
        assert torch.equal(zero(**inputs).logits, expected)  # no double LayerNorm: the base model is unchanged
    for kind in ("residual_1", "residual_2", "shortcut_sa", "shortcut_ffn"):
        model = get_peft_model(tiny_opt(pre_ln), HeteroLoraConfig(**kw))
        for name, module in model.named_modules():
            if name.endswith(f"hetero_{kind}"):
                with torch.no_grad():
                    module.hetlr_B["default"].normal_()
        with torch.no_grad():
            changed = model(**inputs).logits
        assert not torch.allclose(changed, expected, atol=1e-4), kind
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()  # the flattened FFN view: shapes fit
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_opt(pre_ln), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, changed)


def test_opt_glue_recipe_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/recipes/heterolora_opt_glue.py"), "--tiny",
                           "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["heterolora"]["budget"] == 0.25 and result["heterolora"]["proxy"] == "grad_norm"
    assert result["switched_on"] == 3 and result["candidates"] == 11  # floor(.25·4) + round(.25·7), as the authors
    assert [h["step"] for h in result["history"]] == [0, 2, 4, 6, 8, 10]  # every 0.2 epoch of 6 steps + each epoch
