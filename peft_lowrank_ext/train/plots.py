"""Figures of ranks and losses, written straight to files.

Each figure is a ``matplotlib.figure.Figure`` drawn on its own Agg canvas: pyplot and the global
backend are never touched, so calling these in a notebook or an interactive session changes
nothing there. The file format follows the suffix of ``path`` (``.png``, ``.pdf``, ``.svg``, ...).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .ranks import NO_BLOCK, PEFT_PREFIX, layer_and_type, rank_grid

DPI = 110
# Every figure stays readable at its natural size: at most this wide / tall (inches; × DPI = pixels).
MAX_WIDTH = 12.0
MAX_HEIGHT = 11.0
MAX_TICKS = 12  # per axis
MAX_ROW_LABELS = 24  # up to this many heat-map rows every row is named; above, at most MAX_TICKS of them
TICK_FONT = 8
# A cell gets its number only if it is at least this large (inches): smaller ones would be unreadable.
MIN_ANNOTATED_CELL = (0.32, 0.18)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(min(width, MAX_WIDTH), min(height, MAX_HEIGHT)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=DPI)
    return target


def _check_path(path, argument: str = "path") -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{argument}={path!r} is not allowed; pass a file path such as 'figures/ranks.png'")


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def short_module_names(names: list[str]) -> list[str]:
    """Short, unique labels: ``L3.query`` (block 3, last part of the type), longer suffixes only where needed.

    ``bert.encoder.layer.3.attention.self.query`` → ``L3.query``; ``…layer.3.attention.output.dense`` and
    ``…layer.3.output.dense`` → ``L3.attention.output.dense`` and ``L3.output.dense``. Modules outside the
    blocks (``lm_head``, ``classifier.dense``), and any whose short label would not be unique, keep their full name.
    """
    parsed = [layer_and_type(name) for name in names]
    labels = _unique_suffixes(parsed)
    counts = Counter(labels)
    return [name.removeprefix(PEFT_PREFIX) if counts[text] > 1 or layer is None else text
            for name, (layer, _), text in zip(names, parsed, labels)]


def _unique_suffixes(parsed: list[tuple[int | None, str]]) -> list[str]:
    """``L{layer}.{suffix}`` (or ``{suffix}`` outside the blocks), suffixes of the type grown only where needed."""
    parts = [kind.split(".") for _, kind in parsed]
    depth = [1] * len(parsed)

    def label(i: int) -> str:
        suffix = ".".join(parts[i][-depth[i]:])
        return suffix if parsed[i][0] is None else f"L{parsed[i][0]}.{suffix}"

    while True:
        labels = [label(i) for i in range(len(parsed))]
        counts = Counter(labels)
        grow = [i for i, text in enumerate(labels) if counts[text] > 1 and depth[i] < len(parts[i])]
        if not grow:
            return labels
        for i in grow:
            depth[i] += 1


def _short_types(types: list[str]) -> list[str]:
    """The shortest unique suffix of each module type (``attention.self.query`` → ``query``)."""
    labels = _unique_suffixes([(None, kind) for kind in types])
    counts = Counter(labels)
    return [kind if counts[text] > 1 else text for kind, text in zip(types, labels)]


def _row_ticks(axes, labels: list[str]) -> None:
    """Name every row up to MAX_ROW_LABELS rows, else at most MAX_TICKS evenly spaced ones."""
    n = len(labels)
    stride = 1 if n <= MAX_ROW_LABELS else math.ceil(n / MAX_TICKS)
    rows = list(range(0, n, stride))
    axes.set_yticks(rows, [labels[i] for i in rows], fontsize=TICK_FONT)


def _column_ticks(axes, labels: list) -> None:
    n = len(labels)
    stride = max(1, math.ceil(n / MAX_TICKS))
    columns = list(range(0, n, stride))
    axes.set_xticks(columns, [str(labels[i]) for i in columns], fontsize=TICK_FONT)


def _annotate(figure: Figure, axes, values: np.ndarray, fmt: str) -> None:
    """Numbers in the cells, when the cells are large enough to hold them."""
    width, height = figure.get_size_inches()
    rows, cols = values.shape
    if width * 0.75 / cols < MIN_ANNOTATED_CELL[0] or height * 0.6 / rows < MIN_ANNOTATED_CELL[1]:
        return
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (row, col), value in np.ndenumerate(values):
        if math.isfinite(value):
            colour = "white" if value < middle else "black"
            axes.text(col, row, format(value, fmt), ha="center", va="center", fontsize=7, color=colour)


def _colorbar(figure: Figure, image, axes, label: str) -> None:
    bar = figure.colorbar(image, ax=axes, label=label, pad=0.01)
    bar.ax.tick_params(labelsize=TICK_FONT)
    bar.ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=label == "rank"))


def rank_heatmap_figure(ranks: dict[str, int], title: str | None = None) -> Figure:
    """The figure of :func:`plot_rank_heatmap`, not saved (for notebooks and tests)."""
    if not ranks:
        raise ValueError("ranks is empty; pass {module name: rank} with at least one module (see module_ranks)")
    layers, types, grid = rank_grid(ranks)
    values = np.asarray(grid, dtype=float)
    figure = _new_figure(_clamp(2.4 + 0.42 * len(layers), 4.5, MAX_WIDTH), _clamp(1.5 + 0.3 * len(types), 2.6, 9.0))
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), aspect="auto", cmap="viridis", interpolation="nearest")
    _column_ticks(axes, ["other" if layer == NO_BLOCK else layer for layer in layers])
    _row_ticks(axes, _short_types(types))
    _annotate(figure, axes, values, "g")
    _colorbar(figure, image, axes, "rank")
    axes.set_xlabel("layer (block index)")
    axes.set_ylabel("module")
    axes.set_title(title or f"Effective ranks (total {sum(ranks.values())})", fontsize=10)
    return figure


def plot_rank_heatmap(ranks: dict[str, int], path: str | os.PathLike, title: str | None = None) -> Path:
    """Heat map of the effective rank per block (x) and module type (y), numbers in the cells where they fit."""
    if not ranks:
        raise ValueError("ranks is empty; pass {module name: rank} with at least one module (see module_ranks)")
    _check_path(path)
    return _save(rank_heatmap_figure(ranks, title), path)


def _check_snapshots(snapshots, what: str) -> None:
    if not snapshots:
        raise ValueError(f"snapshots is empty; pass [(step, {{module: {what}}}), ...] with at least one snapshot "
                         "(e.g. RankHistory(model).attach() ... history.snapshots)")
    for index, snapshot in enumerate(snapshots):
        if not (isinstance(snapshot, (tuple, list)) and len(snapshot) == 2 and isinstance(snapshot[1], dict)):
            raise ValueError(f"snapshots[{index}]={snapshot!r} is not allowed; each entry must be (step, {{module: {what}}})")
    if not any(values for _, values in snapshots):
        plural = "ranks" if what == "rank" else f"{what} values"
        raise ValueError(f"snapshots holds no module {plural} (every snapshot is empty); record {plural} of an adapted "
                         "model")


def _step_edges(steps: list[int]) -> np.ndarray:
    """Cell edges along the step axis: midpoints between recorded steps (each cell centred on its step)."""
    centres = np.asarray(steps, dtype=float)
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middles = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[centres[0] - (middles[0] - centres[0])], middles,
                           [centres[-1] + (centres[-1] - middles[-1])]])


def _history_figure(snapshots, what: str, colour_label: str, summary_label: str, summary, title: str,
                    vmin: float | None = None, vmax: float | None = None) -> Figure:
    _check_snapshots(snapshots, what)
    modules = list(dict.fromkeys(name for _, values in snapshots for name in values))
    steps = [int(step) for step, _ in snapshots]
    values = np.array([[float(v.get(name, math.nan)) for _, v in snapshots] for name in modules])
    heat_height = _clamp(0.22 * len(modules), 1.6, MAX_HEIGHT - 2.4)
    figure = _new_figure(_clamp(6.0 + 0.03 * len(steps), 6.5, 10.0), heat_height + 2.4)
    heat, line = figure.subplots(2, 1, height_ratios=[heat_height, 1.4], sharex=True)
    mesh = heat.pcolormesh(_step_edges(steps), np.arange(len(modules) + 1) - 0.5, np.ma.masked_invalid(values),
                           cmap="viridis", vmin=vmin, vmax=vmax, rasterized=True)
    heat.set_ylim(len(modules) - 0.5, -0.5)  # first module on top, in model order
    _row_ticks(heat, short_module_names(modules))
    heat.set_ylabel("module")
    heat.tick_params(axis="x", labelbottom=False)
    heat.set_title(title, fontsize=10)
    _colorbar(figure, mesh, heat, colour_label)
    line.plot(steps, [summary(v) for _, v in snapshots], marker="o" if len(steps) <= 40 else None, markersize=3)
    line.set_xlabel("optimizer step")
    line.set_ylabel(summary_label)
    line.grid(alpha=0.3)
    for axes in (heat, line):
        axes.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS - 2, integer=True))
        axes.tick_params(labelsize=TICK_FONT)
    line.yaxis.set_major_locator(MaxNLocator(nbins=4))
    return figure


def rank_history_figure(snapshots: list[tuple[int, dict[str, int]]], title: str | None = None) -> Figure:
    """The figure of :func:`plot_rank_history`, not saved."""
    return _history_figure(snapshots, "rank", "rank", "total rank", lambda ranks: sum(ranks.values()),
                           title or "Effective ranks during training")


def plot_rank_history(snapshots: list[tuple[int, dict[str, int]]], path: str | os.PathLike,
                      title: str | None = None) -> Path:
    """Ranks over training: a heat map module (y, short names ``L3.query``) × optimizer step (x), total rank below."""
    _check_snapshots(snapshots, "rank")
    _check_path(path)
    return _save(rank_history_figure(snapshots, title), path)


def sparsity_history_figure(snapshots: list[tuple[int, dict[str, float]]], title: str | None = None) -> Figure:
    """The figure of :func:`plot_sparsity_history`, not saved."""
    return _history_figure(snapshots, "sparsity", "fraction of A pruned", "mean sparsity",
                           lambda values: sum(values.values()) / max(1, len(values)),
                           title or "Sparsity of A during training", vmin=0.0, vmax=1.0)


def plot_sparsity_history(snapshots: list[tuple[int, dict[str, float]]], path: str | os.PathLike,
                          title: str | None = None) -> Path:
    """PRILoRA prunes entries of A, not ranks: its sparsity per module (y) × optimizer step (x), mean below.

    Record it with ``RankHistory(model, metric="sparsity")`` (:func:`peft_lowrank_ext.prilora_sparsity`).
    """
    _check_snapshots(snapshots, "sparsity")
    _check_path(path)
    return _save(sparsity_history_figure(snapshots, title), path)


def loss_curves_figure(curves: dict[str, list[tuple[int, float]]], title: str | None = None) -> Figure:
    """The figure of :func:`plot_loss_curves`, not saved."""
    figure = _new_figure(6.4, 3.8)
    axes = figure.add_subplot()
    for name, points in curves.items():
        steps, losses = zip(*[(int(step), float(loss)) for step, loss in points])
        axes.plot(steps, losses, label=str(name), marker="o" if len(steps) < 30 else None, markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title or "Training loss", fontsize=10)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS - 2, integer=True))
    axes.tick_params(labelsize=TICK_FONT)
    axes.legend(fontsize=TICK_FONT)
    return figure


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | os.PathLike,
                     title: str | None = None) -> Path:
    """Training loss against optimizer step, one line per method, with a legend."""
    if not curves:
        raise ValueError("curves is empty; pass {method name: [(step, loss), ...]} with at least one method")
    _check_path(path)
    for name, points in curves.items():
        if not points:
            raise ValueError(f"curves[{name!r}] is empty; every method needs at least one (step, loss) point")
    return _save(loss_curves_figure(curves, title), path)
