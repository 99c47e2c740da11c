"""PRILoRA: ranks from depth, config checks, pruning math, pruning by itself in every loop, resume, export."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

from peft_lowrank_ext import PriLoraConfig, export_lora, prilora_ranks, prilora_sparsity, prilora_step
from peft_lowrank_ext.tuners.prilora import (PriLoraLayer, PriLoraScheduleCallback, importance, linear_ranks,
                                             prune_mask, resolve_schedule, scheduled_sparsity,
                                             set_prilora_total_steps)
from peft_lowrank_ext.tuners.prilora.model import prilora_post_step
from models import MINILM, TINY_MODELS, VOCAB
from trainer_utils import lm_dataset, make_tokenizer, text_dataset

LLAMA = TINY_MODELS["llama"]


def llama_config(**overrides):
    kwargs = dict(r_first=2, r_last=4, lora_alpha=8, target_modules=list(LLAMA.target_modules), task_type="CAUSAL_LM",
                  init_weights=False, prune_every=2, prune_start=0, prune_end=4, final_sparsity=0.5)
    kwargs.update(overrides)
    return PriLoraConfig(**kwargs)


def hand_sparsity(step, start=0, end=4, final=0.5, every=2, cubic=True):
    """Sparsity the masks must show after ``step`` steps: the schedule at the latest pruning event."""
    events = [t for t in range(1, step + 1) if t >= start and ((t - start) % every == 0 or t == end)]
    if not events:
        return 0.0
    t = events[-1]
    p = min(1.0, max(0.0, (t - start) / (end - start)))
    return final * (1 - (1 - p) ** 3) if cubic else final * p


def expected_module_sparsity(model, step, **schedule):
    out = {}
    for name, layer in _layers(model):
        d_in = layer.in_features
        out[name] = math.floor(hand_sparsity(step, **schedule) * d_in + 1e-9) / d_in
    return out


def _layers(model):
    root = model.base_model.model if isinstance(model, PeftModel) else model
    return [(n, m) for n, m in root.named_modules() if isinstance(m, PriLoraLayer)]


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "prilr_" in n}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _lm_step(model, optimizer, seed):
    inputs = LLAMA.inputs(batch=4, seq=8, seed=seed)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ----- ranks from depth -------------------------------------------------------------------------
def _gpt2(n):
    return GPT2LMHeadModel(GPT2Config(n_layer=n, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16))


def _llama(n):
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=n,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB,
                                        max_position_embeddings=16))


def _bert(n):
    return BertForSequenceClassification(BertConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=n,
                                                    num_attention_heads=2, vocab_size=VOCAB,
                                                    max_position_embeddings=16))


def _opt(n):
    return OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=24, num_hidden_layers=n, num_attention_heads=2,
                                    vocab_size=VOCAB, max_position_embeddings=16, word_embed_proj_dim=16))


@pytest.mark.parametrize(
    "build, n, targets, block_re, expected",
    [
        (_gpt2, 5, ["c_attn", "c_fc"], r"transformer\.h\.(\d+)\.", [4, 6, 8, 10, 12]),
        (_llama, 4, ["q_proj", "v_proj", "down_proj"], r"model\.layers\.(\d+)\.", [4, 7, 9, 12]),
        (_bert, 3, ["query", "value", "intermediate.dense"], r"encoder\.layer\.(\d+)\.", [4, 8, 12]),
        (_opt, 3, ["q_proj", "fc2"], r"decoder\.layers\.(\d+)\.", [4, 8, 12]),
    ],
    ids=["gpt2", "llama", "bert", "opt"],
)
def test_linear_ranks_from_depth(build, n, targets, block_re, expected):
    import re

    config = PriLoraConfig(target_modules=targets)  # defaults r_first=4, r_last=12
    assert linear_ranks(config.r_first, config.r_last, n) == expected
    model = get_peft_model(build(n), config)
    ranks = prilora_ranks(model)
    assert len(ranks) == n * len(targets)
    for name, r in ranks.items():
        block = int(re.search(block_re, name).group(1))
        assert r == expected[block], name  # the same rank for every target of one block
    for _, layer in _layers(model):
        r = layer._store("r")["default"]
        assert layer._store("A")["default"].shape == (r, layer.in_features)
        assert layer._store("element_mask")["default"].shape == (r, layer.in_features)


def test_minilm_ranks_and_mean_form():
    # r_mean=8 with the default spread r_mean // 2 is the paper's 4 -> 12 example.
    model = get_peft_model(MINILM.build(), PriLoraConfig(r_mean=8, target_modules=["query", "value"],
                                                         task_type="SEQ_CLS"))
    ranks = prilora_ranks(model)
    per_block = {int(name.split("encoder.layer.")[1].split(".")[0]): r for name, r in ranks.items()}
    assert [per_block[i] for i in range(6)] == [4, 6, 7, 9, 10, 12]  # 4 + 8·l/5, halves rounded up


def test_rank_forms_are_exclusive_and_round_trip(tmp_path):
    config = PriLoraConfig(r_mean=6, r_spread=-2)
    assert (config.r_first, config.r_last) == (8, 4)  # decreasing ranks are allowed
    given = PriLoraConfig(r_first=3, r_last=9)
    assert linear_ranks(given.r_first, given.r_last, 4) == [3, 5, 7, 9]
    default = PriLoraConfig()
    assert linear_ranks(default.r_first, default.r_last, 1) == [4]
    with pytest.raises(ValueError, match=r"r_first=2 .*r_first/r_last or as r_mean/r_spread"):
        PriLoraConfig(r_mean=8, r_first=2)
    with pytest.raises(ValueError, match=r"r_spread=2 .*None unless r_mean"):
        PriLoraConfig(r_spread=2)
    # A saved config (all four fields filled) loads back unchanged.
    config.save_pretrained(tmp_path)
    loaded = PriLoraConfig.from_pretrained(tmp_path)
    assert (loaded.r_first, loaded.r_last, loaded.r_mean, loaded.r_spread) == (8, 4, 6, -2)


class _Stack(nn.Module):
    """A model whose block names no default pattern knows: ``stack.blk_<N>.proj``."""

    def __init__(self, n=3, width=8):
        super().__init__()
        self.stack = nn.Module()
        for i in range(n):
            block = nn.Module()
            block.proj = nn.Linear(width, width)
            setattr(self.stack, f"blk_{i}", block)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        for i in range(3):
            x = getattr(self.stack, f"blk_{i}").proj(x)
        return self.head(x)


def test_explicit_block_index_override():
    with pytest.raises(ValueError, match=r"stack\.blk_0\.proj.*block_index_pattern"):
        get_peft_model(_Stack(), PriLoraConfig(target_modules=["proj"]))
    # Pattern alone: L is counted from the module names; with num_blocks L is given.
    model = get_peft_model(_Stack(), PriLoraConfig(target_modules=["proj"], block_index_pattern=r"blk_(\d+)"))
    assert sorted(prilora_ranks(model).values()) == [4, 8, 12]
    model = get_peft_model(_Stack(), PriLoraConfig(target_modules=["proj"], block_index_pattern=r"blk_(\d+)",
                                                   num_blocks=5))
    assert sorted(prilora_ranks(model).values()) == [4, 6, 8]
    with pytest.raises(ValueError, match=r"block index 2, outside \[0, 1\]"):
        get_peft_model(_Stack(), PriLoraConfig(target_modules=["proj"], block_index_pattern=r"blk_(\d+)",
                                               num_blocks=2))
    # The override also re-maps a standard model: GPT-2 blocks counted explicitly.
    model = get_peft_model(_gpt2(2), PriLoraConfig(target_modules=["c_attn"], num_blocks=3))
    assert sorted(prilora_ranks(model).values()) == [4, 8]


def test_error_when_no_block_index():
    # BERT's pooler.dense sits outside the encoder blocks: the error names it and the way out.
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense.*block_index_pattern.*exclude_modules"):
        get_peft_model(_bert(2), PriLoraConfig(target_modules=["dense"]))
    model = get_peft_model(_bert(2), PriLoraConfig(target_modules=["dense"], exclude_modules=["bert.pooler.dense"]))
    assert prilora_ranks(model)


# ----- config checks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("r_first", 0, r"integer in \[1, inf\]"),
        ("r_last", -3, r"integer in \[1, inf\]"),
        ("r_first", 2.5, r"integer in \[1, inf\]"),
        ("r_mean", 0, r"integer in \[1, inf\]"),
        ("lora_alpha", 0, r"\(0.0, inf\)"),
        ("lora_dropout", 1.0, r"\[0.0, 1.0\)"),
        ("final_sparsity", 1.0, r"\[0.0, 1.0\)"),
        ("final_sparsity", -0.1, r"\[0.0, 1.0\)"),
        ("prune_every", 0, r"integer in \[1, inf\]"),
        ("prune_start", -1, r"integer in \[0, inf\]"),
        ("prune_end", -1, r"integer in \[0, inf\]"),
        ("prune_start_fraction", 1.5, r"\[0.0, 1.0\]"),
        ("prune_end_fraction", -0.1, r"\[0.0, 1.0\]"),
        ("prune_every_fraction", 0.0, r"\(0.0, 1.0\]"),
        ("total_steps", 0, r"integer in \[1, inf\]"),
        ("ema_beta", 1.0, r"\[0.0, 1.0\)"),
        ("ema_beta", -0.5, r"\[0.0, 1.0\)"),
        ("ema_beta", float("nan"), r"\[0.0, 1.0\)"),
        ("sparsity_schedule", "exponential", r"'cubic', 'linear'"),
        ("regrow", "yes", "True or False"),
        ("num_blocks", 0, r"integer in \[1, inf\]"),
        ("block_index_pattern", r"blk_\d+", "exactly one capture group"),
        ("block_index_pattern", r"(\w+)_(\d+)", "exactly one capture group"),
        ("block_index_pattern", r"blk_(\d+", "a valid regex"),
    ],
)
def test_bad_config_values_raise_naming_field_and_range(field, value, allowed):
    with pytest.raises(ValueError, match=rf"PriLoraConfig\.{field}=.* is not allowed; {field} must be .*{allowed}"):
        PriLoraConfig(**{field: value})


def test_bad_spread_and_schedule_order():
    with pytest.raises(ValueError, match=r"r_spread=4 .*integer in \[-3, 3\]"):
        PriLoraConfig(r_mean=4, r_spread=4)
    with pytest.raises(ValueError, match=r"prune_end=5 .*integer in \[10, inf\]"):
        PriLoraConfig(prune_start=10, prune_end=5)


# ----- the pruning math ---------------------------------------------------------------------------
def test_importance_and_mask_against_hand_computation():
    a = torch.tensor([[0.5, -2.0, 1.0, 0.1, -0.3],
                      [1.0, 1.0, -1.0, 1.0, 1.0]])
    n = torch.tensor([4.0, 0.01, 1.0, 100.0, 0.0])
    # S_ij = |A_ij| sqrt(n_j): sqrt(n) = [2, 0.1, 1, 10, 0]
    s = torch.tensor([[1.0, 0.2, 1.0, 1.0, 0.0],
                      [2.0, 0.1, 1.0, 10.0, 0.0]])
    torch.testing.assert_close(importance(a, n), s)
    ones = torch.ones_like(a)
    # sparsity 0.5 of 5 columns: floor(2.5) = 2 per row; lowest first, ties by column index.
    expected = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0],
                             [1.0, 0.0, 1.0, 1.0, 0.0]])
    assert torch.equal(prune_mask(a, n, ones, 0.5, regrow=False), expected)
    # sparsity 0.7: floor(3.5) = 3; row 0 ties at 1.0 between columns 0, 2, 3 -> column 0 goes.
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0],
                             [1.0, 0.0, 0.0, 1.0, 0.0]])
    assert torch.equal(prune_mask(a, n, ones, 0.7, regrow=False), expected)
    assert torch.equal(prune_mask(a, n, ones, 0.0, regrow=False), ones)
    # Without regrow an already masked entry stays masked even if it is now the most important one.
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0],
                        [1.0, 1.0, 1.0, 1.0, 1.0]])
    no_regrow = prune_mask(a, n, old, 0.5, regrow=False)
    assert torch.equal(no_regrow[0], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))  # col 3 stays out, then col 4
    regrow = prune_mask(a, n, old, 0.5, regrow=True)
    assert torch.equal(regrow[0], torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0]))  # col 3 comes back
    # Every row keeps at least one entry, whatever the sparsity below 1.
    assert (prune_mask(a, n, ones, 0.99, regrow=True).sum(1) >= 1).all()


def test_schedule_values():
    cubic = PriLoraConfig(prune_start=10, prune_end=20, prune_every=1, final_sparsity=0.8)
    linear = PriLoraConfig(prune_start=10, prune_end=20, prune_every=1, final_sparsity=0.8, sparsity_schedule="linear")
    for step, c, lin in [(0, 0.0, 0.0), (10, 0.0, 0.0), (15, 0.8 * (1 - 0.5**3), 0.4), (20, 0.8, 0.8),
                         (100, 0.8, 0.8)]:
        assert scheduled_sparsity(cubic, step) == pytest.approx(c)
        assert scheduled_sparsity(linear, step) == pytest.approx(lin)


# ----- pruning happens by itself in every loop ----------------------------------------------------
def test_plain_loop_reaches_scheduled_sparsity():
    model = get_peft_model(LLAMA.build(), llama_config())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 6):
        _lm_step(model, opt, seed=step)
        assert prilora_step(model) == step
        assert prilora_sparsity(model) == pytest.approx(expected_module_sparsity(model, step))
    assert set(prilora_sparsity(model).values()) != {0.0}


class _Recorder(TrainerCallback):
    def __init__(self, **schedule):
        self.seen = []
        self.schedule = schedule

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append((state.global_step, prilora_step(model), prilora_sparsity(model),
                          expected_module_sparsity(model, state.global_step, **self.schedule)))


def _args(tmp_path, cls=TrainingArguments, **extra):
    return cls(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
               report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
               dataloader_num_workers=0, **extra)


def _check_recorded(recorder):
    assert [s[0] for s in recorder.seen] == [1, 2, 3, 4, 5]
    for global_step, step, sparsity, expected in recorder.seen:
        assert step == global_step
        assert sparsity == pytest.approx(expected)
    assert recorder.seen[-1][2] and min(recorder.seen[-1][2].values()) > 0.4


def test_hf_trainer_reaches_scheduled_sparsity(tmp_path):
    recorder = _Recorder()
    model = get_peft_model(LLAMA.build(), llama_config())
    # Gradient accumulation: one schedule step per optimizer step, not per micro-batch.
    Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=lm_dataset(48),
            callbacks=[recorder]).train()
    _check_recorded(recorder)


def test_trl_sft_trainer_reaches_scheduled_sparsity(tmp_path):
    recorder = _Recorder()
    trainer = SFTTrainer(model=LLAMA.build(), args=_args(tmp_path, SFTConfig, max_length=16),
                         train_dataset=text_dataset(24), processing_class=make_tokenizer(), peft_config=llama_config(),
                         callbacks=[recorder])
    trainer.train()
    _check_recorded(recorder)


# ----- statistics -------------------------------------------------------------------------------
def test_statistics_ema_is_exact():
    beta = 0.75
    model = get_peft_model(LLAMA.build(), llama_config(ema_beta=beta, prune_start=100, prune_end=100))
    layers = dict(_layers(model))
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for name, layer in layers.items():
        layer.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach().clone())
                                        if mod.training and torch.is_grad_enabled() else None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    expected = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()}
    for step in range(3):
        for name in seen:
            seen[name].clear()
        model.train()
        # Two micro-batches of different lengths (token-weighted mean), plus forwards that must not count.
        for seq in (5, 9):
            inputs = LLAMA.inputs(batch=2, seq=seq, seed=10 * step + seq)
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        with torch.no_grad():
            model(**LLAMA.inputs(seed=99))
        model.eval()
        model(**LLAMA.inputs(seed=98))
        model.train()
        opt.step()
        opt.zero_grad()
        for name, layer in layers.items():
            xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen[name]]).double()
            assert xs.shape[0] == 2 * 5 + 2 * 9
            expected[name] = beta * expected[name] + (1 - beta) * xs.pow(2).mean(0)
            torch.testing.assert_close(layer._store("in_sq_ema")["default"].double(), expected[name],
                                       rtol=1e-5, atol=1e-7)
            assert not layer.pending_statistics()  # folded into the EMA and cleared at the step


def test_statistics_unchanged_by_gradient_checkpointing():
    emas = []
    for checkpointing in (False, True):
        model = get_peft_model(LLAMA.build(), llama_config())
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        model.train()
        _lm_step(model, opt, seed=1)
        emas.append({n: layer._store("in_sq_ema")["default"].clone() for n, layer in _layers(model)})
    for name in emas[0]:
        torch.testing.assert_close(emas[1][name], emas[0][name], rtol=1e-6, atol=1e-8)


# ----- masking, scaling, resume, export -----------------------------------------------------------
def _pruned_model(steps=4, **overrides):
    model = get_peft_model(LLAMA.build(), llama_config(**overrides))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        _lm_step(model, opt, seed=step)
    model.eval()
    return model


def test_masked_entries_contribute_nothing_and_scaling_is_fixed():
    model = get_peft_model(LLAMA.build(), llama_config())
    scalings = {n: layer._store("scaling")["default"] for n, layer in _layers(model)}
    assert {n: 8 / layer._store("r")["default"] for n, layer in _layers(model)} == scalings
    model = _pruned_model()
    inputs = LLAMA.inputs()
    for name, layer in _layers(model):
        assert layer._store("scaling")["default"] == scalings[name]  # pruning never changes s = alpha / r_l
    out = model(**inputs).logits
    # Overwrite every masked entry of A with garbage: outputs unchanged, gradients there exactly zero.
    for _, layer in _layers(model):
        mask = layer._store("element_mask")["default"]
        with torch.no_grad():
            layer._store("A")["default"].masked_fill_(mask == 0, 1e3)
    assert torch.equal(model(**inputs).logits, out)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for _, layer in _layers(model):
        mask = layer._store("element_mask")["default"]
        assert (mask == 0).any()
        assert not layer._store("A")["default"].grad[mask == 0].any()
    # The layer output is exactly base + s·B (A⊙M) x.
    name, layer = _layers(model)[0]
    x = torch.randn(3, layer.in_features)
    a, b = layer._store("A")["default"], layer._store("B")["default"]
    m, s = layer._store("element_mask")["default"], layer._store("scaling")["default"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + s * (x @ (a * m).T) @ b.T)


def test_resume_reproduces_masks_statistics_and_schedule(tmp_path):
    def run(model, opt, steps):
        model.train()
        for step in steps:
            _lm_step(model, opt, seed=step)

    model = get_peft_model(LLAMA.build(), llama_config(prune_end=6, prune_every=1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run(model, opt, range(3))
    model.save_pretrained(tmp_path)
    saved_opt = copy.deepcopy(opt.state_dict())
    at_save = _state(model)
    run(model, opt, range(3, 6))
    final = _state(model)

    resumed = PeftModel.from_pretrained(LLAMA.build(), tmp_path, is_trainable=True)
    _assert_same_state(_state(resumed), at_save)
    assert prilora_step(resumed) == 3
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(saved_opt)
    run(resumed, opt2, range(3, 6))
    _assert_same_state(_state(resumed), final)
    assert prilora_step(resumed) == 6


def test_export_lora_of_pruned_adapter_is_exact_standard_lora(tmp_path):
    model = _pruned_model()
    inputs = LLAMA.inputs()
    expected = model(**inputs).logits
    lora_config = export_lora(model, tmp_path, layout="compact")  # per-module ranks in rank_pattern
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    ranks = prilora_ranks(model)
    assert set(ranks.values()) == {2, 4}
    for name, r in ranks.items():  # per-module ranks as the LoRA config resolves them
        pattern_r = next((v for k, v in lora_config.rank_pattern.items() if k.replace("\\", "") == name),
                         lora_config.r)
        assert pattern_r == r
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    masks = {n: layer._store("element_mask")["default"] for n, layer in _layers(model)}
    for name, mask in masks.items():
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert a.shape == mask.shape
        assert (mask == 0).any() and not a[mask == 0].any()  # pruned entries are zero in the file
    plain = PeftModel.from_pretrained(LLAMA.build(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, expected, atol=1e-6, rtol=0)


def test_inference_and_frozen_adapters_do_not_advance(tmp_path):
    model = _pruned_model(steps=2)
    before = _state(model)
    with torch.no_grad():
        model(**LLAMA.inputs())  # eval mode
    other = nn.Linear(2, 2)  # an optimizer that holds none of the adapter's parameters
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    opt.step()
    _assert_same_state(_state(model), before)

    # A reloaded adapter in inference mode (A frozen) neither gathers statistics nor advances.
    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    frozen.train()
    frozen(**LLAMA.inputs())
    prilora_post_step(frozen.base_model.model)
    _assert_same_state(_state(frozen), before)

    # A step that saw no training tokens advances the schedule but leaves the EMA as it is.
    prilora_post_step(model.base_model.model)
    after = _state(model)
    for name in before:
        if name.endswith("step.default"):
            assert after[name] == before[name] + 1
        elif "in_sq_ema" in name:
            assert torch.equal(after[name], before[name])


# ----- data parallel ------------------------------------------------------------------------------
class _Blocks(nn.Module):
    """Two blocks ``layers.N.proj``; the adapter input is the data itself, so statistics follow the data."""

    def __init__(self, width=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.layers:
            block.proj = nn.Linear(width, width)

    def forward(self, x):
        for block in self.layers:
            x = block.proj(x)
        return x


def _ddp_worker(rank, world, port, out_dir, broadcast_buffers):
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A TCP store: with a file store, one replica once hung in destroy_process_group after both had saved.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        config = PriLoraConfig(r_first=2, r_last=4, target_modules=["proj"], init_weights=False, prune_every=1,
                               prune_start=0, prune_end=2, final_sparsity=0.5)
        model = get_peft_model(_Blocks(), config)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=broadcast_buffers)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=1e-2)
        # Replica 0 sees large values in the first half of the features, replica 1 in the second half:
        # on its own each replica would prune the other half.
        scale = torch.cat([torch.full((8,), 10.0), torch.full((8,), 0.1)])
        scale = scale if rank == 0 else scale.flip(0)
        gen = torch.Generator().manual_seed(rank)
        ddp.train()
        for _ in range(3):
            ddp(torch.randn(4, 16, generator=gen) * scale).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        torch.save(_state(model), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("broadcast_buffers", [False, True])
def test_data_parallel_replicas_take_identical_decisions(tmp_path, broadcast_buffers):
    import torch.multiprocessing as mp

    # spawn, not fork: a fork of the test process can inherit a lock held by another thread (seen as a hung
    # replica once the suite had run bitsandbytes and PEFT's own tests in the same process).
    from test_distributed import _free_port

    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), broadcast_buffers), nprocs=2,
                       join=True, start_method="spawn")
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    masks = [n for n in states[0] if n.endswith("element_mask.default")]
    assert masks and all((states[0][n] == 0).any() for n in masks)
    # The statistics pool both replicas' data: every feature of the first block's input is large somewhere.
    ema = next(t for n, t in states[0].items() if n.endswith("layers.0.proj.prilr_in_sq_ema.default"))
    assert ema.min() > 1.0
    _assert_same_state(states[0], states[1])


# ----- the schedule relative to the run ---------------------------------------------------------------
def test_schedule_fractions_resolve_against_the_run_length():
    default = PriLoraConfig()
    assert (default.prune_start, default.prune_end, default.prune_every) == (None, None, None)
    assert resolve_schedule(default, 100) == (0, 80, 2)  # 0.0, 0.8, 0.02 of the run
    assert resolve_schedule(default, 7) == (0, 6, 1)  # 0.8·7 = 5.6 -> 6; spacing at least one step
    assert resolve_schedule(default, 1000) == (0, 800, 20)
    custom = PriLoraConfig(prune_start_fraction=0.25, prune_end_fraction=0.5, prune_every_fraction=0.1)
    assert resolve_schedule(custom, 40) == (10, 20, 4)
    # Absolute fields win over the fraction they replace; all three absolute need no run length.
    assert resolve_schedule(PriLoraConfig(prune_end=50), 100) == (0, 50, 2)
    assert resolve_schedule(PriLoraConfig(prune_start=3, prune_end=9, prune_every=2), None) == (3, 9, 2)
    # The start fraction 0 needs no run length either, but the end does.
    with pytest.raises(ValueError, match=r"total optimizer steps are unknown.*PriLoraScheduleCallback.*total_steps"):
        resolve_schedule(PriLoraConfig(prune_every=2), None)
    # Both forms of one quantity: only with total_steps, and only when they agree.
    with pytest.raises(ValueError, match=r"PriLoraConfig\.prune_end=80 is not allowed.*not both"):
        PriLoraConfig(prune_end=80, prune_end_fraction=0.8)
    assert resolve_schedule(PriLoraConfig(prune_end=80, prune_end_fraction=0.8, total_steps=100), None) == (0, 80, 2)
    with pytest.raises(ValueError, match=r"prune_end=70 is not allowed.*None or 80"):
        PriLoraConfig(prune_end=70, prune_end_fraction=0.8, total_steps=100)
    # A final step beyond the run, a ramp ending before it starts, and two run lengths are refused.
    with pytest.raises(ValueError, match=r"prune_end=1000 is not allowed.*\[0, 200\].*never be reached"):
        PriLoraConfig(prune_end=1000, total_steps=200)
    with pytest.raises(ValueError, match=r"prune_end_fraction=0.2 is not allowed.*\[0.5, 1.0\]"):
        PriLoraConfig(prune_start_fraction=0.5, prune_end_fraction=0.2)
    with pytest.raises(ValueError, match=r"prune_end=160 is not allowed; prune_end must be an integer in \[300, inf\]"):
        PriLoraConfig(prune_start=300, total_steps=200)
    with pytest.raises(ValueError, match=r"total_steps=100 is not allowed.*None or 50"):
        resolve_schedule(PriLoraConfig(total_steps=100), 50)
    # A saved config (fractions and total) loads back with the same schedule.
    assert scheduled_sparsity(PriLoraConfig(total_steps=10), 4) == pytest.approx(0.5 * (1 - (1 - 4 / 8) ** 3))


def test_plain_loop_with_total_steps_reaches_final_sparsity_at_the_fraction():
    # total_steps=5: end round(0.8·5) = 4, spacing max(1, round(0.1)) = 1.
    model = get_peft_model(LLAMA.build(), llama_config(prune_every=None, prune_start=None, prune_end=None,
                                                       total_steps=5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, 6):
        _lm_step(model, opt, seed=step)
        assert prilora_sparsity(model) == pytest.approx(expected_module_sparsity(model, step, end=4, every=1))
    assert min(prilora_sparsity(model).values()) > 0.4  # final_sparsity 0.5 reached (floor per row)


def test_plain_loop_without_run_length_raises_at_the_first_step_and_setter_fixes_it():
    model = get_peft_model(LLAMA.build(), llama_config(prune_every=None, prune_start=None, prune_end=None))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    before = _state(model)
    inputs = LLAMA.inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with pytest.raises(ValueError, match=r"PRILoRA: the pruning schedule is relative to the run.*"
                                         r"PriLoraScheduleCallback.*total_steps=N.*set_prilora_total_steps"):
        opt.step()
    after = _state(model)
    assert all(torch.equal(after[n], before[n]) for n in before if "step" in n or "in_sq_ema" in n)
    with pytest.raises(ValueError, match=r"set_prilora_total_steps\.total_steps=0 is not allowed"):
        set_prilora_total_steps(model, 0)
    with pytest.raises(ValueError, match=r"prune_end"):  # contradicts an absolute step of the config
        set_prilora_total_steps(get_peft_model(LLAMA.build(), llama_config(prune_end=10)), 5)
    set_prilora_total_steps(model, 5)
    opt.zero_grad()
    for step in range(1, 6):
        _lm_step(model, opt, seed=step)
        assert prilora_sparsity(model) == pytest.approx(expected_module_sparsity(model, step, end=4, every=1))


def test_hf_trainer_schedule_from_max_steps_with_default_arguments(tmp_path):
    # Default TrainingArguments optimizer (fused AdamW where available) and max_grad_norm=1.0; max_steps=5.
    recorder = _Recorder(end=4, every=1)
    model = get_peft_model(LLAMA.build(), llama_config(prune_every=None, prune_start=None, prune_end=None))
    Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=lm_dataset(48),
            callbacks=[PriLoraScheduleCallback(), recorder]).train()
    _check_recorded(recorder)


def test_hf_trainer_without_run_length_fails_clearly(tmp_path):
    model = get_peft_model(LLAMA.build(), llama_config(prune_every=None, prune_start=None, prune_end=None))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=lm_dataset(24))
    with pytest.raises(ValueError, match=r"total optimizer steps are unknown.*PriLoraScheduleCallback"):
        trainer.train()


def test_trl_sft_trainer_schedule_from_max_steps(tmp_path):
    recorder = _Recorder(end=4, every=1)
    config = llama_config(prune_every=None, prune_start=None, prune_end=None)
    trainer = SFTTrainer(model=LLAMA.build(), args=_args(tmp_path, SFTConfig, max_length=16),
                         train_dataset=text_dataset(24), processing_class=make_tokenizer(), peft_config=config,
                         callbacks=[PriLoraScheduleCallback(), recorder])
    trainer.train()
    _check_recorded(recorder)


# ----- padding is not data ----------------------------------------------------------------------------
class _Parallel(nn.Module):
    """Two blocks ``layers.N.proj`` that both read the model input, with an ``attention_mask`` argument."""

    def __init__(self, width=4):
        super().__init__()
        self.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for block in self.layers:
            block.proj = nn.Linear(width, width)

    def forward(self, x, attention_mask=None):
        return sum(block.proj(x) for block in self.layers)


def _parallel_model(beta=0.5):
    torch.manual_seed(0)
    config = PriLoraConfig(r_first=2, r_last=2, target_modules=["proj"], init_weights=False, ema_beta=beta,
                           prune_start=100, prune_end=100, prune_every=100)
    return get_peft_model(_Parallel(), config).train()


def _emas(model):
    return {n: layer._store("in_sq_ema")["default"].clone() for n, layer in _layers(model)}


def test_padding_rows_are_left_out_of_the_statistics_exactly():
    beta = 0.5
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (2, 5, 4), generator=gen).float()  # integers: every sum is exact in fp32
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    padded = x.clone()
    padded[mask == 0] = 37.0  # padding values that would dominate the statistics
    real = x[mask == 1][None]  # the same tokens without padding: (1, 7, 4)

    results = []
    for inputs, kwargs in ((padded, {"attention_mask": mask}), (real, {}),
                           (padded, {"attention_mask": mask.bool()}), (padded, {})):
        model = _parallel_model(beta)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        model(inputs, **kwargs).sum().backward()
        opt.step()
        results.append(_emas(model))
    masked, unpadded, masked_bool, unmasked = results
    expected = (1 - beta) * real[0].double().pow(2).mean(0)  # by hand, from the real tokens only
    for name in masked:
        assert torch.equal(masked[name], unpadded[name]), name
        assert torch.equal(masked_bool[name], unpadded[name]), name
        torch.testing.assert_close(masked[name].double(), expected, rtol=1e-6, atol=0)
        # Without a mask every row counts (the padding value 37 shows up).
        torch.testing.assert_close(unmasked[name].double(), (1 - beta) * padded.reshape(-1, 4).double().pow(2).mean(0),
                                   rtol=1e-6, atol=0)


def test_mask_applies_only_to_inputs_of_the_masks_shape_and_positional_masks_work():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (2, 3, 4), generator=gen).float()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Positional attention_mask (the model's forward signature names it).
    model = _parallel_model()
    model(x, mask).sum().backward()
    layer = _layers(model)[0][1]
    total, tokens = layer.pending_statistics()["default"]
    assert int(tokens) == 3
    assert torch.equal(total, x[mask == 1].pow(2).sum(0))
    # A layer input whose leading dims are not the mask's [batch, seq] counts every row.
    model = _parallel_model()
    flat = x.reshape(6, 4)
    model(flat, attention_mask=mask).sum().backward()
    total, tokens = _layers(model)[0][1].pending_statistics()["default"]
    assert tokens == 6 and torch.equal(total, flat.pow(2).sum(0))


def test_llama_statistics_exclude_padding_through_peft_and_checkpointing():
    beta = 0.75
    for checkpointing in (False, True):
        model = get_peft_model(LLAMA.build(), llama_config(ema_beta=beta, prune_start=100, prune_end=100))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = dict(_layers(model))
        seen = {name: [] for name in layers}
        for name, layer in layers.items():
            layer.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach().clone())
                                            if mod.training and torch.is_grad_enabled() else None)
        inputs = LLAMA.inputs(batch=3, seq=6, seed=4)
        inputs["attention_mask"] = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        keep = inputs["attention_mask"].reshape(-1) == 1
        for name, layer in layers.items():
            xs = torch.cat([x.reshape(-1, x.shape[-1])[keep] for x in seen[name]]).double()
            assert xs.shape[0] == 12 * len(seen[name])  # 12 real tokens per pass (twice with checkpointing)
            expected = (1 - beta) * xs.pow(2).mean(0)
            torch.testing.assert_close(layer._store("in_sq_ema")["default"].double(), expected, rtol=1e-5, atol=1e-7)
