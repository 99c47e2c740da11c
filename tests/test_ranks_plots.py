"""Effective ranks of every method, their layer × type grid and history, and the figures drawn from them."""

from __future__ import annotations

import gc
import itertools
import math
import weakref

import matplotlib
import pytest
import torch
from matplotlib.image import imread
from peft import LoraConfig, get_peft_model

from methods import METHODS, lm_batches, train_steps
from models import TINY_MODELS
from peft_lowrank_ext import AutoLoraSearch, HeteroLoraConfig, autolora_ranks, autolora_select
from peft_lowrank_ext.tuners.gated.layer import GatedLoraLayer
from peft_lowrank_ext.tuners.heterolora.layer import HeteroShortcut
from peft_lowrank_ext import prilora_sparsity
from peft_lowrank_ext.train.plots import (MAX_ROW_LABELS, MAX_TICKS, loss_curves_figure, plot_loss_curves,
                                          plot_rank_heatmap, plot_rank_history, plot_sparsity_history,
                                          rank_heatmap_figure, rank_history_figure, short_module_names,
                                          sparsity_history_figure)
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
    train_steps(model, 2)
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
    train_steps(model, 1)  # one bi-level step (β moves a little)
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
    train_steps(model, 5)
    steps = [step for step, _ in history.snapshots]
    assert steps == [0, 2, 4]
    assert set(history.snapshots[0][1].values()) == {4}  # before the allocation: every candidate on
    assert sorted(history.snapshots[1][1].values()) == [0, 0, 0, 4, 4, 4]
    assert history.snapshots[2][1] == module_ranks(model)
    history.detach()
    train_steps(model, 1)
    assert len(history.snapshots) == 3
    with RankHistory(model) as every_step:  # a second history on the same model does not disturb the first
        train_steps(model, 2)
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
    train_steps(model, 1)
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
    train_steps(model, 3)
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
    with pytest.raises(ValueError, match="snapshots holds no module sparsity values"):
        plot_sparsity_history([(0, {})], tmp_path / "x.png")
    with pytest.raises(ValueError, match="curves is empty"):
        plot_loss_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"curves\['rlora'\] is empty"):
        plot_loss_curves({"lora": [(1, 1.0)], "rlora": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="path=None"):
        plot_loss_curves({"lora": [(1, 1.0)]}, None)
    assert not (tmp_path / "x.png").exists()


def test_sparsity_history_records_prilora_pruning():
    model = wrap("prilora")
    with pytest.raises(ValueError, match="metric='density'"):
        RankHistory(model, metric="density")
    with pytest.raises(ValueError, match="metric='sparsity' is not allowed"):
        RankHistory(wrap("heterolora"), metric="sparsity")
    history = RankHistory(model, metric="sparsity").attach()
    history.record(0)
    train_steps(model, 3)
    history.detach()
    assert [step for step, _ in history.snapshots] == [0, 1, 2, 3]
    assert list(history.snapshots[0][1]) == ADAPTED and set(history.snapshots[0][1].values()) == {0.0}
    assert history.snapshots[-1][1] == prilora_sparsity(model)
    mean = [sum(v.values()) / len(v) for _, v in history.snapshots]
    assert mean == sorted(mean) and mean[-1] > 0  # pruning only grows (prune_end=3, final_sparsity=0.5)
    # PRILoRA's ranks stay flat meanwhile: that is why the CLI draws its sparsity, not its rank history
    assert module_ranks(model) == {n: (2 if ".h.0." in n else 4) for n in ADAPTED}


def test_short_module_names():
    assert short_module_names(["bert.encoder.layer.3.attention.self.query", "bert.encoder.layer.3.attention.output.dense",
                               "bert.encoder.layer.3.output.dense", "base_model.model.model.layers.10.mlp.up_proj",
                               "classifier.dense"]) == \
        ["L3.query", "L3.attention.output.dense", "L3.output.dense", "L10.up_proj", "classifier.dense"]
    # two stacks with the same block index: the short labels would collide, the full names are kept
    assert short_module_names(["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"]) \
        == ["encoder.block.0.layer.0.SelfAttention.q", "decoder.block.0.layer.0.SelfAttention.q"]


def _names(layers, types, stem="model.layers"):
    return [f"{stem}.{layer}.{kind}" for layer in range(layers) for kind in types]


BERT_QV = _names(12, ["attention.self.query", "attention.self.value"], "bert.encoder.layer")
LLAMA_ALL = _names(32, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
TINY_QV = BERT_QV[:4]


def _history(modules, steps, value):
    return [(step, {m: value(i, step) for i, m in enumerate(modules)}) for step in range(steps + 1)]


READABILITY_CASES = {  # what the CLI writes (compare/train), from tiny runs to a long 32-layer Llama run
    "rank_history_tiny": lambda: rank_history_figure(_history(TINY_QV, 4, lambda i, s: 4 * (i % 2))),
    "rank_history_bert_130_steps": lambda: rank_history_figure(_history(BERT_QV, 130, lambda i, s: (i + s) % 3 * 4)),
    "rank_history_llama_1000_steps": lambda: rank_history_figure(_history(LLAMA_ALL, 1000, lambda i, s: (i * s) % 9)),
    "sparsity_history_tiny": lambda: sparsity_history_figure(_history(TINY_QV, 4, lambda i, s: s / 8)),
    "sparsity_history_bert_130_steps": lambda: sparsity_history_figure(_history(BERT_QV, 130, lambda i, s: s / 260)),
    "rank_heatmap_bert": lambda: rank_heatmap_figure({m: i % 8 + 1 for i, m in enumerate(BERT_QV)}),
    "rank_heatmap_llama": lambda: rank_heatmap_figure({m: i % 16 + 1 for i, m in enumerate(LLAMA_ALL + ["lm_head"])}),
    "loss_curves": lambda: loss_curves_figure({m: [(s, 2 / (1 + s / 50)) for s in range(1, 500)]
                                               for m in ("lora", "rlora", "autolora", "prilora", "heterolora")}),
}


def _drawn_tick_labels(axis):
    """The tick labels matplotlib draws: non-empty, visible, at a tick inside the view limits."""
    low, high = sorted(axis.get_view_interval())
    slack = (high - low) * 1e-9
    locs = axis.get_majorticklocs()
    ticks = axis.get_major_ticks(len(locs))
    return [tick.label1 for loc, tick in zip(locs, ticks)
            if low - slack <= loc <= high + slack and tick.label1.get_visible() and tick.label1.get_text()]


@pytest.mark.parametrize("case", sorted(READABILITY_CASES))
def test_figures_are_readable_at_their_natural_size(case, tmp_path):
    figure = READABILITY_CASES[case]()
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    width, height = figure.bbox.width, figure.bbox.height
    assert width <= 2000 and height <= 2000, (width, height)
    inside = figure.bbox.expanded(1.0, 1.0).padded(1)
    for axes in figure.axes:
        for axis, limit in ((axes.xaxis, MAX_TICKS), (axes.yaxis, max(MAX_TICKS, MAX_ROW_LABELS))):
            labels = _drawn_tick_labels(axis)
            assert len(labels) <= limit, (case, [t.get_text() for t in labels])
            boxes = [t.get_window_extent(renderer) for t in labels]
            for box, label in zip(boxes, labels):
                assert inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1), \
                    (case, label.get_text(), "outside the figure")
            for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2):
                assert not a.overlaps(b), (case, labels[i].get_text(), labels[j].get_text())
    # module names are short (L3.query), not the full dotted path
    texts = [t.get_text() for axes in figure.axes for t in _drawn_tick_labels(axes.yaxis)]
    assert not any(t.startswith(("bert.", "model.layers.")) for t in texts)
    path = tmp_path / f"{case}.png"
    figure.savefig(path)
    image = imread(path)
    assert image.shape[1] <= 2000 and image.shape[0] <= 2000
