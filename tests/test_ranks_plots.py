"""Effective ranks of every method, their layer × type grid and history, and the figures drawn from them."""

from __future__ import annotations

import gc
import math
import weakref

import matplotlib
import pytest
import torch
from matplotlib.image import imread
from peft import LoraConfig, get_peft_model

from methods import METHODS, lm_batches
from models import TINY_MODELS
from peft_lowrank_ext import AutoLoraSearch, HeteroLoraConfig, autolora_ranks, autolora_select
from peft_lowrank_ext.tuners.gated.layer import GatedLoraLayer
from peft_lowrank_ext.tuners.heterolora.layer import HeteroShortcut
from peft_lowrank_ext.train.plots import plot_loss_curves, plot_rank_heatmap, plot_rank_history
from peft_lowrank_ext.train.ranks import RankHistory, layer_and_type, module_ranks, rank_grid
from peft_lowrank_ext.tuners.rlora.layer import RLoraLayer

GPT2 = TINY_MODELS["gpt2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def wrap(method: str, **overrides):
    if method == "lora":
        config = LoraConfig(r=3, target_modules=list(GPT2.target_modules), task_type=GPT2.task_type)
    elif method == "heterolora_shortcuts":
        config = HeteroLoraConfig(r=4, target_modules=list(GPT2.target_modules), task_type=GPT2.task_type,
                                  shortcuts=["residual_1", "shortcut_ffn"], shortcut_r=2, budget=0.5,
                                  proxy="grad_norm", proxy_batches=1, init_weights=False)
    else:
        config = METHODS[method].make_config(GPT2.target_modules, GPT2.task_type)
        if method == "autolora":  # the cheaper β step: the ranks, not the hypergradient, matter here
            config.hypergradient = "first_order"
    for key, value in overrides.items():
        setattr(config, key, value)
    model = get_peft_model(GPT2.build(), config)
    if method == "autolora":
        AutoLoraSearch(lm_batches(n=1, batch=2, seq=6)).attach(model)
    return model


def train(model, steps: int) -> None:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(n=steps, batch=2, seq=6):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def ranks_from_masks(model) -> dict[str, int]:
    """The expected ranks, read from each layer's own tensors (independently of ranks.py)."""
    expected = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, GatedLoraLayer):
            on = float(module._store("module_on")["default"]) != 0
            expected[name] = int((module._store("rank_mask")["default"] != 0).sum()) if on else 0
        elif isinstance(module, RLoraLayer):
            expected[name] = module.rlr_config["default"].r
        elif hasattr(module, "lora_A") and "default" in getattr(module, "r", {}):
            expected[name] = module.lora_A["default"].weight.shape[0]
    return expected


ADAPTED = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
           "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]


@pytest.mark.parametrize("method", ["lora", "rlora", "prilora", "heterolora"])
def test_module_ranks_match_the_layers(method):
    model = wrap(method)
    train(model, 2)
    ranks = module_ranks(model)
    assert list(ranks) == ADAPTED  # names without PEFT's prefix, in model order
    assert ranks == ranks_from_masks(model)
    if method == "lora":
        assert set(ranks.values()) == {3}
    if method == "rlora":
        assert set(ranks.values()) == {4}
    if method == "prilora":  # ranks rise with depth: r_first=2 in block 0, r_last=4 in block 1
        assert [ranks[n] for n in ADAPTED] == [2, 2, 2, 4, 4, 4]
    if method == "heterolora":  # after the one-step scoring window, exactly half the candidates are on
        assert sorted(ranks.values()) == [0, 0, 0, 4, 4, 4]


def test_heterolora_shortcuts_are_listed_and_switched_off_modules_count_zero():
    model = wrap("heterolora_shortcuts")
    ranks = module_ranks(model)
    shortcuts = [n for n, m in model.base_model.model.named_modules() if isinstance(m, HeteroShortcut)]
    assert shortcuts == ["transformer.h.0.hetero_residual_1", "transformer.h.1.hetero_residual_1",
                         "transformer.h.1.hetero_shortcut_ffn"]
    assert all(ranks[n] == 2 for n in shortcuts) and len(ranks) == len(ADAPTED) + 3
    layer = model.base_model.model.get_submodule(shortcuts[1])
    layer.set_on("default", False)
    layer._store("rank_mask")["default"][0] = 0.0  # a masked rank does not revive a switched-off module
    assert module_ranks(model)[shortcuts[1]] == 0
    other = model.base_model.model.get_submodule(ADAPTED[2])
    other._store("rank_mask")["default"][1:3] = 0.0
    assert module_ranks(model)[ADAPTED[2]] == 2
    assert module_ranks(model) == ranks_from_masks(model)


def test_autolora_ranks_follow_thresholding_during_search_and_masks_after_selection():
    model = wrap("autolora")
    train(model, 1)  # one bi-level step (β moves a little)
    root = model.base_model.model
    first = root.get_submodule(ADAPTED[0])
    first._store("beta")["default"].copy_(torch.tensor([6.0, 0.0, 0.0, 0.0]))  # α ≈ (0.99, ...): keeps 1
    ranks = module_ranks(model)
    assert ranks == autolora_ranks(model)
    assert ranks[ADAPTED[0]] == 1
    # during the search every component is still active: the masks would say 4
    assert ranks_from_masks(model)[ADAPTED[0]] == 4
    selected = autolora_select(model)
    assert module_ranks(model) == selected == ranks_from_masks(model)


def test_module_ranks_rejects_an_unknown_adapter():
    model = wrap("prilora")
    with pytest.raises(ValueError, match="adapter_name='other'"):
        module_ranks(model, "other")
    with pytest.raises(ValueError, match="adapter_name='other'"):
        RankHistory(model, adapter_name="other")
    with pytest.raises(ValueError, match="every=0"):
        RankHistory(model, every=0)


@pytest.mark.parametrize("name, expected", [
    ("transformer.h.1.attn.c_attn", (1, "attn.c_attn")),
    ("base_model.model.transformer.h.0.mlp.c_proj", (0, "mlp.c_proj")),
    ("model.layers.3.self_attn.q_proj", (3, "self_attn.q_proj")),
    ("bert.encoder.layer.11.attention.self.query", (11, "attention.self.query")),
    ("bert.encoder.layer.2.output.dense", (2, "output.dense")),
    ("model.decoder.layers.5.fc1", (5, "fc1")),
    ("transformer.h.1.hetero_shortcut_ffn", (1, "hetero_shortcut_ffn")),
    ("lm_head", (None, "lm_head")),
    ("classifier.dense", (None, "classifier.dense")),
])
def test_layer_and_type(name, expected):
    assert layer_and_type(name) == expected


def test_rank_grid_places_ranks_and_marks_missing_cells():
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 8,
             "model.layers.1.mlp.down_proj": 2, "lm_head": 1}
    layers, types, grid = rank_grid(ranks)
    assert layers == [-1, 0, 1]
    assert types == ["self_attn.q_proj", "mlp.down_proj", "lm_head"]
    assert grid[0][1:] == [4.0, 8.0] and math.isnan(grid[0][0])
    assert math.isnan(grid[1][1]) and grid[1][2] == 2.0
    assert grid[2][0] == 1.0 and math.isnan(grid[2][1])
    # two stacks with the same block indices (encoder-decoder): types are qualified, nothing is overwritten
    layers, types, grid = rank_grid({"encoder.block.0.layer.0.SelfAttention.q": 3,
                                     "decoder.block.0.layer.0.SelfAttention.q": 5})
    assert layers == [0] and len(types) == 2 and sorted(row[0] for row in grid) == [3.0, 5.0]
    with pytest.raises(ValueError, match="ranks is empty"):
        rank_grid({})


def test_rank_history_records_every_nth_step_and_stops_when_detached():
    model = wrap("heterolora")
    history = RankHistory(model, every=2).attach()
    history.record(0)
    train(model, 5)
    steps = [step for step, _ in history.snapshots]
    assert steps == [0, 2, 4]
    assert set(history.snapshots[0][1].values()) == {4}  # before the allocation: every candidate on
    assert sorted(history.snapshots[1][1].values()) == [0, 0, 0, 4, 4, 4]
    assert history.snapshots[2][1] == module_ranks(model)
    history.detach()
    train(model, 1)
    assert len(history.snapshots) == 3
    with RankHistory(model) as every_step:  # a second history on the same model does not disturb the first
        train(model, 2)
    assert [s for s, _ in every_step.snapshots] == [1, 2]


def test_an_attached_history_does_not_keep_the_model_alive():
    model = wrap("prilora")
    RankHistory(model).attach()
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_rank_history_records_under_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from trainer_utils import lm_dataset

    model = wrap("heterolora")
    history = RankHistory(model, every=1).attach()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=lm_dataset(12)).train()
    history.detach()
    assert [step for step, _ in history.snapshots] == [1, 2, 3]
    assert sorted(history.snapshots[-1][1].values()) == [0, 0, 0, 4, 4, 4]


def test_rank_history_only_counts_steps_of_optimizers_holding_the_model():
    model = wrap("prilora")
    history = RankHistory(model).attach()
    other = torch.nn.Linear(2, 2)
    unrelated = torch.optim.SGD(other.parameters(), lr=0.1)
    other(torch.ones(1, 2)).sum().backward()
    unrelated.step()
    assert history.snapshots == []
    train(model, 1)
    assert len(history.snapshots) == 1
    history.detach()


def _check_png(path, min_bytes=2_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > min_bytes
    image = imread(path)
    assert image.shape[0] > 50 and image.shape[1] > 50
    return image


def test_figures_render_to_png_without_touching_the_global_backend(tmp_path):
    backend = matplotlib.get_backend()
    model = wrap("heterolora_shortcuts")
    history = RankHistory(model).attach()
    history.record(0)
    train(model, 3)
    history.detach()
    ranks = module_ranks(model)

    heat = plot_rank_heatmap(ranks, tmp_path / "a" / "b" / "ranks.png", title="GPT-2 HeteroLoRA")
    assert heat == tmp_path / "a" / "b" / "ranks.png"
    _check_png(heat)
    hist = plot_rank_history(history.snapshots, tmp_path / "history.png")
    _check_png(hist)
    curves = {"lora": [(1, 2.0), (2, 1.5), (3, 1.2)], "rlora": [(1, 2.1), (2, 1.9)]}
    loss = plot_loss_curves(curves, str(tmp_path / "loss.png"))
    _check_png(loss)
    svg = plot_rank_heatmap({"lm_head": 2}, tmp_path / "one.svg")
    assert b"<svg" in svg.read_bytes()[:2000]
    # a larger heat map gives a larger picture (the size follows the number of layers)
    many = {f"model.layers.{i}.self_attn.q_proj": i % 5 + 1 for i in range(24)}
    wide = _check_png(plot_rank_heatmap(many, tmp_path / "wide.png"))
    assert wide.shape[1] > imread(heat).shape[1]
    assert matplotlib.get_backend() == backend


def test_figures_refuse_empty_input(tmp_path):
    with pytest.raises(ValueError, match="ranks is empty"):
        plot_rank_heatmap({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="snapshots is empty"):
        plot_rank_history([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="snapshots holds no module ranks"):
        plot_rank_history([(1, {}), (2, {})], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"snapshots\[0\]"):
        plot_rank_history([{"a": 1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="curves is empty"):
        plot_loss_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"curves\['rlora'\] is empty"):
        plot_loss_curves({"lora": [(1, 1.0)], "rlora": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="path=None"):
        plot_loss_curves({"lora": [(1, 1.0)]}, None)
    assert not (tmp_path / "x.png").exists()
