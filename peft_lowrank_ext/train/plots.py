"""Figures of ranks and losses, written straight to files.

Each figure is a ``matplotlib.figure.Figure`` drawn on its own Agg canvas: pyplot and the global
backend are never touched, so calling these in a notebook or an interactive session changes
nothing there. The file format follows the suffix of ``path`` (``.png``, ``.pdf``, ``.svg``, ...).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .ranks import NO_BLOCK, rank_grid

DPI = 110
# Above this many cells the numbers are left out of a heat map (they would be unreadable).
MAX_ANNOTATED_CELLS = 600


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=DPI, bbox_inches="tight")
    return target


def _check_path(path, argument: str = "path") -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"{argument}={path!r} is not allowed; pass a file path such as 'figures/ranks.png'")


def _annotate(axes, values: np.ndarray) -> None:
    if values.size > MAX_ANNOTATED_CELLS:
        return
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (row, col), value in np.ndenumerate(values):
        if math.isfinite(value):
            colour = "white" if value < middle else "black"
            axes.text(col, row, f"{value:g}", ha="center", va="center", fontsize=7, color=colour)


def _heatmap(figure: Figure, axes, values: np.ndarray, x_labels, y_labels, colour_label: str) -> None:
    masked = np.ma.masked_invalid(values)
    image = axes.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(x_labels)), [str(x) for x in x_labels])
    axes.set_yticks(range(len(y_labels)), list(y_labels), fontsize=7 if len(y_labels) > 20 else 9)
    _annotate(axes, values)
    figure.colorbar(image, ax=axes, label=colour_label)


def plot_rank_heatmap(ranks: dict[str, int], path: str | os.PathLike, title: str | None = None) -> Path:
    """Heat map of the effective rank per block (x) and module type (y), numbers in the cells."""
    if not ranks:
        raise ValueError("ranks is empty; pass {module name: rank} with at least one module (see module_ranks)")
    _check_path(path)
    layers, types, grid = rank_grid(ranks)
    values = np.asarray(grid, dtype=float)
    figure = _new_figure(max(4.0, 1.6 + 0.45 * len(layers)), max(2.5, 1.2 + 0.35 * len(types)))
    axes = figure.add_subplot()
    _heatmap(figure, axes, values, ["other" if layer == NO_BLOCK else layer for layer in layers], types, "rank")
    axes.set_xlabel("layer (block index)")
    axes.set_ylabel("module")
    axes.set_title(title or f"Effective ranks (total {sum(ranks.values())})")
    return _save(figure, path)


def plot_rank_history(snapshots: list[tuple[int, dict[str, int]]], path: str | os.PathLike,
                      title: str | None = None) -> Path:
    """Ranks over training: a heat map module (y) × recorded step (x), and the total rank per step below."""
    if not snapshots:
        raise ValueError("snapshots is empty; pass [(step, {module: rank}), ...] with at least one snapshot "
                         "(e.g. RankHistory(model).attach() ... history.snapshots)")
    _check_path(path)
    for index, snapshot in enumerate(snapshots):
        if not (isinstance(snapshot, (tuple, list)) and len(snapshot) == 2 and isinstance(snapshot[1], dict)):
            raise ValueError(f"snapshots[{index}]={snapshot!r} is not allowed; each entry must be (step, {{module: rank}})")
    modules = list(dict.fromkeys(name for _, ranks in snapshots for name in ranks))
    if not modules:
        raise ValueError("snapshots holds no module ranks (every snapshot is empty); record ranks of an adapted model")
    steps = [int(step) for step, _ in snapshots]
    values = np.array([[float(ranks.get(name, math.nan)) for _, ranks in snapshots] for name in modules])
    totals = [sum(ranks.values()) for _, ranks in snapshots]

    width = max(5.0, 2.5 + 0.35 * len(steps))
    heat_height = max(2.0, 0.8 + 0.22 * len(modules))
    figure = _new_figure(width, heat_height + 2.0)
    heat, line = figure.subplots(2, 1, height_ratios=[heat_height, 1.6], sharex=False)
    labels = [name.removeprefix("base_model.model.") for name in modules]
    _heatmap(figure, heat, values, steps, labels, "rank")
    heat.set_xlabel("optimizer step")
    heat.set_title(title or "Effective ranks during training")
    if len(steps) > 25:  # keep the step labels readable
        ticks = np.linspace(0, len(steps) - 1, 10).round().astype(int)
        heat.set_xticks(ticks, [str(steps[i]) for i in ticks])
    line.plot(steps, totals, marker="o", markersize=3)
    line.set_xlabel("optimizer step")
    line.set_ylabel("total rank")
    line.grid(alpha=0.3)
    return _save(figure, path)


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: str | os.PathLike,
                     title: str | None = None) -> Path:
    """Training loss against optimizer step, one line per method, with a legend."""
    if not curves:
        raise ValueError("curves is empty; pass {method name: [(step, loss), ...]} with at least one method")
    _check_path(path)
    for name, points in curves.items():
        if not points:
            raise ValueError(f"curves[{name!r}] is empty; every method needs at least one (step, loss) point")
    figure = _new_figure(6.0, 3.6)
    axes = figure.add_subplot()
    for name, points in curves.items():
        steps, losses = zip(*[(int(step), float(loss)) for step, loss in points])
        axes.plot(steps, losses, label=str(name), marker="o" if len(steps) < 30 else None, markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss")
    axes.set_title(title or "Training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)
