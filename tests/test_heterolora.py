"""HeteroLoRA: config checks, budget, proxies against hand computations, allocation in every loop,
switched-off modules (no gradient, no compute, DDP), resume, shortcuts on GPT-2 / Llama / BERT."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import SFTConfig, SFTTrainer

from peft_lowrank_ext import HeteroLoraConfig, export_lora, heterolora_allocation, heterolora_score
from peft_lowrank_ext.tuners.gated import layer as gated_layer
from peft_lowrank_ext.tuners.heterolora import HeteroLoraLayer, HeteroShortcut, budget_count
from peft_lowrank_ext.tuners.heterolora.shortcuts import SHORTCUT_ATTR, TAP_ATTR
from methods import hand_alpha_test
from models import TINY_MODELS
from trainer_utils import lm_dataset, make_tokenizer, text_dataset

LLAMA = TINY_MODELS["llama"]
ALL_SHORTCUTS = ["residual_1", "residual_2", "shortcut_sa", "shortcut_ffn"]


def llama_model(**overrides):
    kwargs = dict(r=4, lora_alpha=8, target_modules=list(LLAMA.target_modules), task_type="CAUSAL_LM",
                  init_weights=False, budget=0.5, proxy_batches=2, timing="window")
    kwargs.update(overrides)
    return get_peft_model(LLAMA.build(), HeteroLoraConfig(**kwargs))


def lm_batch(seed: int, batch: int = 2, seq: int = 7):
    inputs = LLAMA.inputs(batch=batch, seq=seq, seed=seed)
    return {**inputs, "labels": inputs["input_ids"]}


def adapter_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, HeteroLoraLayer)]


def on_names(model):
    return sorted(n for n, v in heterolora_allocation(model)["modules"].items() if v["on"])


# ----- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"r": 0}, "r"), ({"lora_alpha": 0}, "lora_alpha"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"shortcut_r": 0}, "shortcut_r"), ({"shortcut_alpha": -1.0}, "shortcut_alpha"),
    ({"shortcuts": ["residual_3"]}, "shortcuts"), ({"shortcuts": "residual_1"}, "shortcuts"),
    ({"shortcuts": ["residual_1", "residual_1"]}, "shortcuts"),
    ({"budget": 0.0}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": float("nan")}, "budget"),
    ({"proxy": "fisher"}, "proxy"), ({"proxy_batches": 0}, "proxy_batches"), ({"proxy_batches": 1.5}, "proxy_batches"),
    ({"mode": "online"}, "mode"), ({"realloc_every": 0}, "realloc_every"), ({"ranking": "joint"}, "ranking"),
    ({"alpha_test_tolerance": 0.0}, "alpha_test_tolerance"), ({"seed": -1}, "seed"),
    ({"history_size": 0}, "history_size"), ({"bias": "lora"}, "bias"),
    ({"zero_score_fallback": "random"}, "zero_score_fallback"), ({"zero_score_fallback": None}, "zero_score_fallback"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"HeteroLoraConfig\.{field}="):
        HeteroLoraConfig(**kwargs)


def test_config_defaults_and_allowed_values_in_message():
    c = HeteroLoraConfig()
    assert (c.r, c.lora_alpha, c.shortcut_r, c.shortcut_alpha, c.budget, c.proxy_batches) == (8, 16.0, 8, 4.0, 0.25, 32)
    assert c.shortcuts == [] and c.mode == "static" and c.ranking == "combined" and c.alpha_test_tolerance == 0.01
    assert c.timing == "authors" and c.realloc_every == 0.1 and c.steps_per_epoch is None and c.proxy == "grad_norm"
    with pytest.raises(ValueError, match="'constant', 'grad_norm', 'weight_grad_norm', 'snip', 'synflow', "
                                         "'synflow_logits', 'alpha_test', 'alpha_test_delta'"):
        HeteroLoraConfig(proxy="x")
    assert HeteroLoraConfig(shortcuts=["shortcut_ffn", "residual_1"]).shortcuts == ["residual_1", "shortcut_ffn"]
    assert c.zero_score_fallback == "tie_break"
    with pytest.raises(ValueError, match=r"HeteroLoraConfig\.zero_score_fallback='x'.*'tie_break', 'grad_norm'"):
        HeteroLoraConfig(zero_score_fallback="x")


def test_old_saved_config_without_zero_score_fallback_loads_with_the_default(tmp_path):
    import json

    from peft import PeftConfig

    HeteroLoraConfig(proxy="snip", zero_score_fallback="grad_norm").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["zero_score_fallback"] == "grad_norm"
    del saved["zero_score_fallback"]
    path.write_text(json.dumps(saved))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, HeteroLoraConfig) and loaded.zero_score_fallback == "tie_break"


@pytest.mark.parametrize("budget, n, k", [(0.25, 6, 2), (0.25, 12, 3), (0.25, 48, 12), (0.5, 5, 3), (0.01, 10, 1),
                                          (1.0, 7, 7), (0.35, 20, 7), (0.3, 5, 2), (0.25, 1, 1)])
def test_budget_rounding(budget, n, k):
    assert budget_count(budget, n) == k  # nearest integer, halves up, at least 1


# ----- proxies against hand computations -------------------------------------------------------------
class TinyNet(nn.Module):
    """Embedding → fc1 → tanh → fc2 → mean over tokens; cross-entropy loss."""

    def __init__(self, vocab=11, d=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, classes)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, labels=None):
        h = torch.tanh(self.fc1(self.emb(input_ids)))
        logits = self.fc2(h).mean(1)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def tiny(proxy, init_weights=False, **kw):
    torch.manual_seed(5)
    config = HeteroLoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_weights=init_weights,
                              proxy=proxy, budget=0.5, **{"proxy_batches": 2, **kw})
    return get_peft_model(TinyNet(), config)


def tiny_batches():
    gen = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(0, 11, (4, 5), generator=gen),
             "labels": torch.randint(0, 3, (4,), generator=gen)} for _ in range(2)]


def hand_params(model):
    net = model.base_model.model
    get = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    p = {"E": get(net.emb.weight)}
    for m in ("fc1", "fc2"):
        layer = getattr(net, m)
        p[m] = dict(W=get(layer.base_layer.weight), b=get(layer.base_layer.bias), A=get(layer.hetlr_A["default"]),
                    B=get(layer.hetlr_B["default"]), s=layer.hetlr_scaling["default"])
    return p


def hand_forward(p, input_ids, labels=None, scales=(1.0, 1.0), x=None, layer=False):
    """``layer``: scale the whole layer output (the authors' alpha test), else only ΔW x."""
    def lin(m, h, scale):
        q = p[m]
        if layer:
            return scale * (h @ q["W"].T + q["b"] + q["s"] * (h @ q["A"].T) @ q["B"].T)
        return h @ q["W"].T + q["b"] + q["s"] * scale * (h @ q["A"].T) @ q["B"].T

    h = p["E"][input_ids] if x is None else x
    h = torch.tanh(lin("fc1", h, scales[0]))
    logits = lin("fc2", h, scales[1]).mean(1)
    return logits if labels is None else F.cross_entropy(logits, labels)


def hand_grads(p, batch):
    loss = hand_forward(p, batch["input_ids"], batch["labels"])
    return torch.autograd.grad(loss, [p[m][k] for m in ("fc1", "fc2") for k in ("A", "B")])


def scores_of(model):
    mods = heterolora_allocation(model)["modules"]
    return [mods["fc1"]["score"], mods["fc2"]["score"]]


@pytest.mark.parametrize("proxy", ["grad_norm", "snip"])
def test_gradient_proxies_match_hand_computation(proxy):
    model = tiny(proxy)
    p = hand_params(model)
    expected = torch.zeros(2)
    for batch in tiny_batches():
        ga1, gb1, ga2, gb2 = hand_grads(p, batch)
        for i, (m, ga, gb) in enumerate((("fc1", ga1, gb1), ("fc2", ga2, gb2))):
            if proxy == "grad_norm":
                expected[i] += ga.norm() + gb.norm()
            else:
                expected[i] += (p[m]["A"] * ga).abs().sum() + (p[m]["B"] * gb).abs().sum()
    report = heterolora_score(model, tiny_batches())
    torch.testing.assert_close(torch.tensor(scores_of(model)), expected / 2, rtol=1e-5, atol=1e-7)
    assert report["switched_on"] == 1 and report["history"][0]["fallback"] is False
    assert report["modules"]["fc1" if expected[0] > expected[1] else "fc2"]["on"]


def test_synflow_logits_matches_hand_computation():
    model = tiny("synflow_logits")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    p = hand_params(model)
    with torch.no_grad():
        for t in [p["E"]] + [v for m in ("fc1", "fc2") for k, v in p[m].items() if k != "s"]:
            t.abs_()
    total = hand_forward(p, None, x=torch.ones(4, 5, 6)).sum()
    grads = torch.autograd.grad(total, [p[m][k] for m in ("fc1", "fc2") for k in ("A", "B")])
    expected = [(p["fc1"]["A"] * grads[0]).abs().sum() + (p["fc1"]["B"] * grads[1]).abs().sum(),
                (p["fc2"]["A"] * grads[2]).abs().sum() + (p["fc2"]["B"] * grads[3]).abs().sum()]
    heterolora_score(model, tiny_batches())
    torch.testing.assert_close(torch.tensor(scores_of(model)), torch.stack(expected).detach(), rtol=1e-5, atol=1e-7)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before if "module_on" not in n and "hetlr_" not in n)
    assert all(torch.equal(before[n], after[n]) for n in before if n.endswith(("hetlr_A.default", "hetlr_B.default")))


def test_alpha_test_delta_matches_hand_binary_search():
    model = tiny("alpha_test_delta", alpha_test_tolerance=0.005)
    p = hand_params(model)
    batches = tiny_batches()
    expected = []
    with torch.no_grad():
        for batch in batches:  # labels = the adapted model's own predictions: scaling a module down hurts
            batch["labels"] = hand_forward(p, batch["input_ids"]).argmax(-1)
            loss = lambda s: float(hand_forward(p, batch["input_ids"], batch["labels"], scales=s))  # noqa: E731
            base = loss((1.0, 1.0))
            row = hand_alpha_test(lambda s: loss(s) > base + 0.005 * abs(base))
            expected.append(row)
    heterolora_score(model, batches)
    torch.testing.assert_close(torch.tensor(scores_of(model)), torch.tensor(expected).mean(0), rtol=1e-6, atol=1e-6)
    assert any(v > 0 for v in scores_of(model))


def test_constant_proxy_is_seeded_random_and_allocates_at_wrap():
    picks = set()
    for seed in range(6):
        model = llama_model(proxy="constant", seed=seed)
        report = heterolora_allocation(model)
        assert report["allocations"] == 1 and report["switched_on"] == 4 and report["phase"] == "allocated"
        assert all(v["score"] == 0 for v in report["modules"].values())
        picks.add(tuple(on_names(model)))
        assert on_names(llama_model(proxy="constant", seed=seed)) == on_names(model)
    assert len(picks) > 1


@pytest.mark.parametrize("proxy", ["snip", "synflow", "synflow_logits", "alpha_test_delta"])
def test_zero_scores_at_b_zero_fall_back_to_gradient_norm_when_asked(proxy):
    model = tiny(proxy, init_weights=True, zero_score_fallback="grad_norm")  # B = 0: these proxies are exactly zero
    with pytest.warns(UserWarning, match="exactly zero.*gradient norm"):
        report = heterolora_score(model, tiny_batches())
    assert report["history"][0]["fallback"] is True and report["history"][0]["all_zero"] is True
    p = hand_params(model)
    expected = torch.zeros(2)
    for batch in tiny_batches():
        ga1, gb1, ga2, gb2 = hand_grads(p, batch)
        assert ga1.abs().sum() == 0 and ga2.abs().sum() == 0  # ∇A = s Bᵀ(…) = 0 at B = 0
        expected += torch.stack([gb1.norm(), gb2.norm()])
    torch.testing.assert_close(torch.tensor(scores_of(model)), expected / 2, rtol=1e-5, atol=1e-7)


def _b_zero_allocation(proxy, seed, **kw):
    model = tiny(proxy, init_weights=True, seed=seed, **kw)
    if proxy == "constant":  # allocated at wrap time: the seeded tie-break of allocation 0 on all-zero scores
        return heterolora_allocation(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return heterolora_score(model, tiny_batches())


def _on(report):
    return tuple(sorted(report["history"][-1]["on"]))


@pytest.mark.parametrize("proxy", ["snip", "synflow", "synflow_logits", "alpha_test_delta"])
def test_zero_scores_at_b_zero_default_is_the_seeded_tie_break(proxy):
    """The authors' behaviour: all-zero scores leave the allocation to the random tie-break (not grad_norm)."""
    differs = False
    for seed in range(4):
        with pytest.warns(UserWarning, match="exactly zero.*tie-break"):
            report = heterolora_score(tiny(proxy, init_weights=True, seed=seed), tiny_batches())
        entry = report["history"][0]
        assert entry["all_zero"] is True and entry["fallback"] is False
        assert all(v == 0 for v in entry["scores"].values()) and report["switched_on"] == 1
        tie_break = _on(_b_zero_allocation("constant", seed))
        assert _on(report) == tie_break  # exactly the seeded tie-break the package uses for ties
        assert _on(_b_zero_allocation(proxy, seed)) == tie_break  # deterministic for a given seed
        differs |= tie_break != _on(_b_zero_allocation("grad_norm", seed))
    assert differs  # some seed's tie-break is not grad_norm's choice, so the two are told apart


def test_snip_at_b_zero_tie_break_differs_from_grad_norm_and_is_stable():
    seed = next(s for s in range(16)
                if _on(_b_zero_allocation("constant", s)) != _on(_b_zero_allocation("grad_norm", s)))
    first = _b_zero_allocation("snip", seed)
    assert _on(first) == _on(_b_zero_allocation("constant", seed)) != _on(_b_zero_allocation("grad_norm", seed))
    again = _b_zero_allocation("snip", seed)
    assert again == first  # identical report (allocation, scores, history) across calls
    model = tiny("snip", init_weights=True, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heterolora_score(model, tiny_batches())
    assert heterolora_allocation(model) == heterolora_allocation(model) == first
    # grad_norm asked for: the allocation is grad_norm's, with its scores, and marked as the fallback
    fallback = _b_zero_allocation("snip", seed, zero_score_fallback="grad_norm")
    grad_norm = _b_zero_allocation("grad_norm", seed)
    assert _on(fallback) == _on(grad_norm) and fallback["history"][0]["fallback"] is True
    assert fallback["history"][0]["scores"] == grad_norm["history"][0]["scores"]
    assert grad_norm["history"][0]["fallback"] is False and grad_norm["history"][0]["all_zero"] is False


# ----- allocation in a plain loop ---------------------------------------------------------------------
class ComputeCounter:
    """Counts calls of the gated low-rank product (one per switched-on module per forward)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = gated_layer.masked_lowrank

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(gated_layer, "masked_lowrank", counted)


def _adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "hetlr_" in n}


def _module_of(param_name):
    return param_name.split(".hetlr_")[0].removeprefix("base_model.model.")


def run_loop(model, steps, on_step=None, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    for step in range(steps):
        batch = lm_batch(step)
        model(**batch).loss.backward()
        if on_step is not None:
            on_step(step, model)
        opt.step()
        opt.zero_grad()
    return opt


def test_static_allocation_plain_loop_budget_every_step(monkeypatch):
    model = llama_model(proxy="snip", proxy_batches=2)
    counter = ComputeCounter(monkeypatch)
    k = 4
    log = []

    def on_step(step, m):
        graded = {_module_of(n) for n, p in m.named_parameters() if "hetlr_" in n and p.grad is not None}
        log.append((step, counter.calls, graded, set(on_names(m)), _adapter_tensors(m)))
        counter.calls = 0

    run_loop(model, 6, on_step)
    report = heterolora_allocation(model)
    assert report["allocations"] == 1 and report["history"][0]["step"] == 2 and report["switched_on"] == k
    final = _adapter_tensors(model)
    for step, calls, graded, on, before in log:
        if step < 2:  # scoring window: every candidate on in the forward pass ...
            assert calls == 8 and len(graded) == 8
        else:  # ... afterwards exactly k on: k products per forward, k modules with gradients
            assert calls == k and graded == on and len(on) == k
    # No adapter weight moved during the scoring window (so A, B at allocation are the initial ones).
    after_window = log[2][4]
    assert all(torch.equal(after_window[n], log[0][4][n]) for n in after_window)
    # Afterwards only switched-on modules move (AdamW's weight decay does not touch the others).
    on = set(on_names(model))
    for n in final:
        assert torch.equal(final[n], after_window[n]) != (_module_of(n) in on), n


def test_dynamic_reallocation_plain_loop():
    model = llama_model(proxy="grad_norm", mode="dynamic", proxy_batches=2, realloc_every=3)
    seen = []
    run_loop(model, 8, lambda step, m: seen.append(len(on_names(m))))
    report = heterolora_allocation(model)
    # First window: steps 0-1 → allocation after 2 steps; then every 3 steps, each scored on the 2 steps before it.
    assert [h["step"] for h in report["history"]] == [2, 5, 8]
    assert report["allocations"] == 3 and report["next_allocation_after_step"] == 11
    assert seen[:2] == [8, 8] and all(n == 4 for n in seen[2:])  # exactly k on at every training step
    assert all(len(h["on"]) == 4 and h["fallback"] is False for h in report["history"])
    assert all(v["score"] > 0 for v in report["modules"].values())


def test_switched_off_modules_get_no_gradient_and_no_compute(monkeypatch):
    model = llama_model(proxy="constant", budget=0.25)
    counter = ComputeCounter(monkeypatch)
    model.train()
    model(**lm_batch(0)).loss.backward()
    on = set(on_names(model))
    assert counter.calls == len(on) == 2
    for n, p in model.named_parameters():
        if "hetlr_" in n:
            assert p.requires_grad  # kept trainable: a later re-allocation can switch the module back on
            assert (p.grad is not None) == (_module_of(n) in on), n


def test_heterolora_score_before_training_keeps_every_step_for_training():
    model = llama_model(proxy="grad_norm", proxy_batches=3)
    report = heterolora_score(model, [lm_batch(100 + i) for i in range(5)])  # only the first 3 are scored
    assert report["phase"] == "allocated" and report["history"][0]["step"] == 0
    start = _adapter_tensors(model)
    run_loop(model, 1)
    moved = {_module_of(n) for n, p in _adapter_tensors(model).items() if not torch.equal(p, start[n])}
    assert moved == set(on_names(model)) and heterolora_allocation(model)["allocations"] == 1


def test_export_after_allocation_omits_switched_off_modules(tmp_path):
    model = llama_model(proxy="grad_norm", budget=0.25)
    heterolora_score(model, [lm_batch(0)])
    inputs = LLAMA.inputs()
    model.eval()
    expected = _logits(model, inputs)
    lora_config = export_lora(model, tmp_path)
    assert sorted(lora_config.target_modules) == on_names(model) and len(on_names(model)) == 2
    plain = PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    torch.testing.assert_close(_logits(plain, inputs), expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()  # switched-off modules merge as exactly nothing
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def test_resume_reproduces_allocation_and_history():
    def fresh():
        torch.manual_seed(0)
        return llama_model(proxy="snip", mode="dynamic", proxy_batches=2, realloc_every=2)

    full = fresh()
    run_loop(full, 6)
    expected = heterolora_allocation(full)

    first = fresh()
    opt = run_loop(first, 3)
    saved, opt_state = get_peft_model_state_dict(first), opt.state_dict()
    resumed = fresh()
    set_peft_model_state_dict(resumed, saved)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=5e-2, weight_decay=0.1)
    opt2.load_state_dict(opt_state)
    resumed.train()
    for step in range(3, 6):
        resumed(**lm_batch(step)).loss.backward()
        opt2.step()
        opt2.zero_grad()
    assert heterolora_allocation(resumed) == expected
    final, again = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(final[n], again[n]) for n in final if "hetlr_" in n)


def test_frozen_or_inference_adapters_do_not_advance(tmp_path):
    model = llama_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(LLAMA.build(), tmp_path)  # inference mode: the adapter is frozen
    head = loaded.base_model.model.lm_head.weight.requires_grad_(True)  # ... while something else trains
    opt = torch.optim.SGD([head], lr=0.1)
    loaded.train()
    loaded(**lm_batch(0)).loss.backward()
    opt.step()
    report = heterolora_allocation(loaded)
    assert report["step"] == 0 and report["allocations"] == 0 and report["switched_on"] == 8


# ----- HF Trainer and TRL SFTTrainer, no extra user code --------------------------------------------
def _args(cls, out, steps, **kw):
    return cls(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-2,
               logging_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, **kw)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_hf_trainer_dynamic_allocation_and_exact_resume(tmp_path):
    def trainer(out, callbacks=()):
        model = llama_model(proxy="grad_norm", mode="dynamic", proxy_batches=2, realloc_every=1)
        args = _args(TrainingArguments, out, 4, save_strategy="steps", save_steps=3)
        return Trainer(model=model, args=args, train_dataset=lm_dataset(24), callbacks=list(callbacks))

    full = trainer(tmp_path / "full")
    full.train()
    report = heterolora_allocation(full.model)
    assert [h["step"] for h in report["history"]] == [2, 3, 4] and report["switched_on"] == 4

    trainer(tmp_path / "resumed", [StopAfter(3)]).train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-3"))
    assert heterolora_allocation(resumed.model) == report
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a if "hetlr_" in n)


def test_trl_sft_trainer_dynamic(tmp_path):
    """SFTTrainer re-allocates by itself (static allocation under SFTTrainer: the conformance resume test)."""
    config = HeteroLoraConfig(r=4, lora_alpha=8, target_modules=list(LLAMA.target_modules), task_type="CAUSAL_LM",
                              budget=0.25, proxy="snip", proxy_batches=1, mode="dynamic", realloc_every=2)
    args = _args(SFTConfig, tmp_path, 5, save_strategy="no", max_length=16)
    trainer = SFTTrainer(model=LLAMA.build(), args=args, train_dataset=text_dataset(24),
                         processing_class=make_tokenizer(), peft_config=config)
    with pytest.warns(UserWarning, match="exactly zero"):  # B = 0 at the first allocation: SNIP ties everywhere
        trainer.train()
    report = heterolora_allocation(trainer.model)
    # timing="authors" (default): before steps 0, 2, 4 (step % realloc_every == 0); no step spent scoring
    assert [h["step"] for h in report["history"]] == [0, 2, 4] and report["switched_on"] == 2
    assert [h["all_zero"] for h in report["history"]] == [True, False, False]
    assert not any(h["fallback"] for h in report["history"])  # the seeded tie-break, as in the authors' code


def test_ddp_without_unused_parameter_errors():
    """A real (single-process, gloo) DDP run with find_unused_parameters=False; without the zero tie it fails."""
    script = textwrap.dedent(
        """
        import os, sys, torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        sys.path.insert(0, sys.argv[1])
        from peft import get_peft_model
        from peft_lowrank_ext import HeteroLoraConfig, heterolora_allocation
        from peft_lowrank_ext.tuners.heterolora.layer import HeteroLoraLayer
        from models import TINY_MODELS
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
        dist.init_process_group("gloo", rank=0, world_size=1)
        case = TINY_MODELS["llama"]

        def run():
            m = get_peft_model(case.build(), HeteroLoraConfig(target_modules=list(case.target_modules),
                task_type="CAUSAL_LM", budget=0.25, proxy_batches=1, init_weights=False, shortcuts=["residual_1"]))
            m.train()
            ddp = DDP(m, find_unused_parameters=False)
            opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
            for step in range(3):
                inputs = case.inputs(seed=step)
                ddp(**inputs, labels=inputs["input_ids"]).loss.backward()
                if step == 0:
                    start = {n: p.detach().clone() for n, p in m.named_parameters() if "hetlr_" in n}
                opt.step()
                opt.zero_grad()
            on = {n for n, v in heterolora_allocation(m)["modules"].items() if v["on"]}
            moved = {n.split(".hetlr_")[0].removeprefix("base_model.model.") for n, p in m.named_parameters()
                     if "hetlr_" in n and not torch.equal(p, start[n])}
            assert moved == on and len(on) == 3, (moved, on)

        run()
        print("DDP-OK", flush=True)
        HeteroLoraLayer._unused_tie = lambda self: None  # the switched-off modules now take no part
        try:
            run()
        except RuntimeError as err:
            print("NO-TIE-FAILS" if "Expected to have finished reduction" in str(err) else err)
        dist.destroy_process_group()
        """
    )
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", script, tests_dir, "29561"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "DDP-OK" in proc.stdout, proc.stderr[-3000:]
    assert "NO-TIE-FAILS" in proc.stdout, proc.stdout[-2000:]


# ----- shortcuts ------------------------------------------------------------------------------------
SHORTCUT_MODELS = ["gpt2", "llama", "bert"]


def shortcut_model(name, init_weights=True, **kw):
    case = TINY_MODELS[name]
    kwargs = dict(target_modules=list(case.target_modules), task_type=case.task_type, init_weights=init_weights,
                  shortcuts=ALL_SHORTCUTS, budget=0.5, proxy_batches=1, timing="window")
    config = HeteroLoraConfig(**{**kwargs, **kw})
    return case, get_peft_model(case.build(), config)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _switch(model, kinds_on):
    for _, layer in adapter_layers(model):
        layer.set_on("default", layer.kind in kinds_on)


@pytest.mark.parametrize("name", SHORTCUT_MODELS)
def test_shortcuts_start_as_noop_train_save_load(name, tmp_path):
    case, model = shortcut_model(name)
    inputs = case.inputs()
    assert torch.equal(_logits(model, inputs), _logits(case.build(), inputs))  # identity / zero start
    report = heterolora_allocation(model)
    kinds = [v["kind"] for v in report["modules"].values()]
    assert kinds.count("residual_1") == kinds.count("residual_2") == kinds.count("shortcut_sa") == 2
    assert kinds.count("shortcut_ffn") == 1  # none in block 0

    _, model = shortcut_model(name, init_weights=False)
    changed = _logits(model, inputs)
    assert not torch.allclose(changed, _logits(case.build(), inputs), atol=1e-5)
    model.train()
    labels = inputs["input_ids"] if case.task_type == "CAUSAL_LM" else torch.tensor([0, 1])
    model(**inputs, labels=labels).loss.backward()
    shortcut_params = [(n, p) for n, p in model.named_parameters() if "hetero_" in n]
    assert shortcut_params and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in shortcut_params)
    model.eval()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert torch.equal(_logits(reloaded, inputs), changed)
    with model.disable_adapter():
        assert torch.equal(_logits(model, inputs), _logits(case.build(), inputs))


@pytest.mark.parametrize("name", SHORTCUT_MODELS)
def test_shortcuts_export_and_merge_behaviour(name, tmp_path):
    case, model = shortcut_model(name, init_weights=False)
    inputs = case.inputs()
    with pytest.raises(ValueError, match="cannot be exported as a plain LoRA adapter"):
        export_lora(model, tmp_path / "refused")
    with pytest.raises(ValueError, match="cannot be merged into the base weights"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_adapter()

    _switch(model, {"lora"})  # shortcuts off: they contribute nothing, so export and merge are exact
    expected = _logits(model, inputs)
    export_lora(model, tmp_path / "lora")
    plain = PeftModel.from_pretrained(case.build(), tmp_path / "lora")
    torch.testing.assert_close(_logits(plain, inputs), expected, atol=1e-5, rtol=1e-5)
    merged = model.merge_and_unload()
    assert not any(name in dict(merged.named_modules()) for name in SHORTCUT_ATTR.values())
    assert not any(TAP_ATTR in m.__dict__ for m in merged.modules())
    torch.testing.assert_close(_logits(merged, inputs), expected, atol=1e-5, rtol=1e-5)


def _delta(module, h):
    return module.hetlr_scaling["default"] * (h @ module.hetlr_A["default"].T) @ module.hetlr_B["default"].T


@pytest.mark.parametrize("name", SHORTCUT_MODELS)
def test_shortcuts_add_the_right_maps_at_the_right_points(name):
    """Block 1 with only shortcuts on, against a hand-written forward of the same block."""
    case, model = shortcut_model(name, init_weights=False)
    _switch(model, set(ALL_SHORTCUTS))
    net = model.base_model.model
    blocks = {"gpt2": lambda: net.transformer.h, "llama": lambda: net.model.layers,
              "bert": lambda: net.bert.encoder.layer}[name]()
    captured = {}
    handle = blocks[1].register_forward_pre_hook(lambda m, a, k: captured.setdefault("in", (a, k)), with_kwargs=True)
    out_hook = blocks[1].register_forward_hook(lambda m, a, o: captured.setdefault("out", o))
    with torch.no_grad():
        model(**case.inputs())
    handle.remove()
    out_hook.remove()
    args, kwargs = captured["in"]
    b = blocks[1]
    h0 = args[0] if args else kwargs["hidden_states"]
    prev_hf = blocks[0].__dict__[TAP_ATTR].h_ffn
    sc = {k: getattr(b, SHORTCUT_ATTR[k]) for k in ALL_SHORTCUTS}
    with torch.no_grad(), model.disable_adapter():
        if name == "gpt2":
            attn = b.attn(b.ln_1(h0), attention_mask=kwargs.get("attention_mask"))[0]
            h1 = h0 + attn + _delta(sc["residual_1"], h0) + _delta(sc["shortcut_ffn"], prev_hf)
            expected = h1 + b.mlp(b.ln_2(h1)) + _delta(sc["residual_2"], h1) + _delta(sc["shortcut_sa"], h0)
        elif name == "llama":
            attn = b.self_attn(hidden_states=b.input_layernorm(h0), attention_mask=kwargs.get("attention_mask"),
                               position_embeddings=kwargs["position_embeddings"])[0]
            h1 = h0 + attn + _delta(sc["residual_1"], h0) + _delta(sc["shortcut_ffn"], prev_hf)
            expected = h1 + b.mlp(b.post_attention_layernorm(h1)) + _delta(sc["residual_2"], h1) \
                + _delta(sc["shortcut_sa"], h0)
        else:
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            ctx = b.attention.self(h0, attention_mask=mask)[0]
            o = b.attention.output
            h1 = o.LayerNorm(o.dense(ctx) + h0 + _delta(sc["residual_1"], h0) + _delta(sc["shortcut_ffn"], prev_hf))
            f = b.output
            expected = f.LayerNorm(f.dense(b.intermediate(h1)) + h1 + _delta(sc["residual_2"], h1)
                                   + _delta(sc["shortcut_sa"], h0))
    out = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_shortcut_gradients_exact_under_non_reentrant_checkpointing():
    grads = []
    for checkpointing in (False, True):
        case, model = shortcut_model("llama", init_weights=False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        inputs = case.inputs()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_shortcuts_on_unsupported_architecture_raise_at_wrap():
    with pytest.raises(ValueError, match="shortcuts is not supported for TinyNet"):
        get_peft_model(TinyNet(), HeteroLoraConfig(target_modules=["fc1"], shortcuts=["residual_1"]))


def test_separated_ranking_budgets_each_kind():
    _, model = shortcut_model("llama", init_weights=False, ranking="separated", budget=0.25, proxy="constant")
    report = heterolora_allocation(model)
    kinds_on = [v["kind"] for v in report["modules"].values() if v["on"]]
    assert sum(k == "lora" for k in kinds_on) == 2 and sum(k != "lora" for k in kinds_on) == 2  # 8 LoRA, 7 shortcuts
    _, combined = shortcut_model("llama", init_weights=False, budget=0.25, proxy="constant")
    assert heterolora_allocation(combined)["switched_on"] == 4  # round(0.25 · 15)


def test_shortcut_allocation_in_training_and_unload():
    case, model = shortcut_model("gpt2", init_weights=False, proxy="grad_norm", budget=0.3)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        inputs = case.inputs(seed=step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    report = heterolora_allocation(model)
    assert report["allocations"] == 1 and report["switched_on"] == budget_count(0.3, report["candidates"])
    base = model.unload().eval()
    assert not any(isinstance(m, (HeteroShortcut, HeteroLoraLayer)) for m in base.modules())
    assert torch.equal(_logits(base, case.inputs()), _logits(case.build(), case.inputs()))


def test_largest_allowed_seed_allocates():
    """The tie-break generator's seed is derived from ``seed``; the largest seed the config allows must
    not overflow torch's int64 seed (found by the property test)."""
    from models import tiny_llama

    config = HeteroLoraConfig(r=2, target_modules=["q_proj", "v_proj"], budget=0.5, proxy="constant",
                              seed=2**62)
    model = get_peft_model(tiny_llama(), config)
    on = [layer.hetlr_module_on["default"].item() for layer in model.modules() if isinstance(layer, HeteroLoraLayer)]
    assert len(on) > 0 and sum(on) == budget_count(0.5, len(on))
