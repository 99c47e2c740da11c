"""What ``train``/``compare`` leave behind: the side-by-side table, results.json/.md and the figures."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

CLASSIFICATION_COLUMNS = ("method", "accuracy", "trainable params", "adapter file", "optimizer state",
                          "train time", "time / step", "peak memory")
REGRESSION_COLUMNS = ("method", "pearson", "spearman", "eval MSE", "trainable params", "adapter file",
                      "optimizer state", "train time", "time / step", "peak memory")
CAUSAL_LM_COLUMNS = ("method", "eval loss", "perplexity", "trainable params", "adapter file", "optimizer state",
                     "train time", "time / step", "peak memory")


def human_bytes(n: float | None) -> str:
    """``1.5 KiB``-style size (``n/a`` for None); negative differences keep their unit."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _is_lm(results: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("extra", {}).get("task") == "causal-lm" for r in results)


def _is_regression(results: Sequence[dict[str, Any]]) -> bool:
    return any(r.get("task") == "regression" for r in results)


def _corr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # NaN (constant predictions) prints as nan


def _step_cell(r: dict[str, Any]) -> str:
    cell = f"{1000 * r['time_per_step_s']:.0f} ms"
    search = r.get("extra", {}).get("search")
    if search:  # AutoLoRA: the retrain step is a LoRA step; the search step is the method's own cost
        cell += f" (search {1000 * search['time_per_step_s']:.0f} ms)"
    return cell


def _time_cell(r: dict[str, Any]) -> str:
    search = r.get("extra", {}).get("search")
    total = r["train_time_s"] + (search["train_time_s"] if search else 0.0)
    return f"{total:.1f} s"


def _peak_cell(r: dict[str, Any]) -> str:
    peaks = [r.get("peak_rss_bytes"), (r.get("extra", {}).get("search") or {}).get("peak_rss_bytes")]
    peaks = [p for p in peaks if p is not None]
    return human_bytes(max(peaks)) if peaks else "n/a"


def table_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    lm, reg = _is_lm(results), _is_regression(results)
    rows = []
    for r in results:
        if lm:
            metric = [f"{r['eval_loss']:.4f}", f"{r['extra'].get('perplexity', float('nan')):.2f}"]
        elif reg:
            metric = [_corr(r.get("pearson")), _corr(r.get("spearman")), f"{r['eval_loss']:.4f}"]
        else:
            metric = [f"{100 * r['accuracy']:.1f}%"]
        rows.append([r["method"], *metric, f"{r['trainable_params']:,}", human_bytes(r["adapter_bytes"]),
                     human_bytes(r["optimizer_state_bytes"]), _time_cell(r), _step_cell(r), _peak_cell(r)])
    return rows


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    columns = (CAUSAL_LM_COLUMNS if _is_lm(results) else REGRESSION_COLUMNS if _is_regression(results)
               else CLASSIFICATION_COLUMNS)
    rows = table_rows(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in rows)])


def ratios(results: Sequence[dict[str, Any]]) -> str:
    """One line per method against LoRA: parameters, adapter file, time per step, metric."""
    by = {r["method"]: r for r in results}
    if "lora" not in by or len(by) < 2:
        return ""
    base, lm, lines = by["lora"], _is_lm(results), []
    for name, r in by.items():
        if name == "lora":
            continue
        if lm:
            metric = f"eval loss {r['eval_loss'] - base['eval_loss']:+.4f}"
        elif _is_regression(results):
            metric = f"Pearson {(r.get('pearson') or float('nan')) - (base.get('pearson') or float('nan')):+.4f}"
        else:
            metric = f"accuracy {100 * (r['accuracy'] - base['accuracy']):+.1f} points"
        lines.append(f"{name} vs LoRA: {r['trainable_params'] / base['trainable_params']:.3f}x trainable parameters, "
                     f"{r['adapter_bytes'] / base['adapter_bytes']:.3f}x adapter file, "
                     f"{r['time_per_step_s'] / base['time_per_step_s']:.2f}x time per step, {metric}.")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def command_line(argv: Sequence[str] | None) -> str:
    return "python -m peft_lowrank_ext " + shlex.join(list(argv if argv is not None else sys.argv[1:]))


def write_results(output_dir: Path, args, data, results: list[dict[str, Any]], wall_s: float,
                  figures: list[Path], argv: Sequence[str] | None) -> tuple[Path, Path]:
    """``results.json`` (everything) and ``results.md`` (table, settings, machine, date, command)."""
    from peft_lowrank_ext.train.models import resolve_model_path

    settings = {k: v for k, v in vars(args).items() if k not in ("subparser", "config_parser")}
    now = datetime.datetime.now().astimezone()
    env = environment()
    payload = {
        "command": args.command,
        "command_line": command_line(argv),
        "date": now.isoformat(timespec="seconds"),
        "task": args.task,
        "model": resolve_model_path(args.model) if args.task != "causal-lm" else str(args.model),
        "data": {"source": data.source, "train_rows": len(data.train), "eval_rows": len(data.eval),
                 "num_labels": getattr(data, "num_labels", None), "task": getattr(data, "task", args.task),
                 "sentence_pairs": getattr(data, "is_pair", False),
                 "label_map": {str(k): v for k, v in data.label_map.items()} if getattr(data, "label_map", None)
                 else None},
        "settings": settings,
        "results": results,
        "figures": [p.name for p in figures],
        "wall_time_s": wall_s,
        "environment": env,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "results.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")

    alpha = args.lora_alpha if args.lora_alpha is not None else 2 * args.r
    targets = ", ".join(results[0]["extra"].get("target_modules") or []) if results and results[0]["method"] != "autolora" else ""
    md = [f"# peft-lowrank-ext {args.command}", "",
          f"* command: `{payload['command_line']}`",
          f"* date: {payload['date']}",
          f"* machine: {env['platform']}, {env['cpu_count']} CPUs, torch threads {env['torch_threads']}"
          + (f", GPU {env['cuda']}" if env["cuda"] else ", no GPU")
          + (f", load average {env['load_average'][0]:.1f}" if env["load_average"] else "")
          + f"; torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}",
          f"* task: {args.task}; model: `{payload['model']}`",
          f"* data: {data.describe()}",
          f"* r={args.r}, alpha={alpha:g}" + (f", targets: {targets}" if targets else ""),
          f"* epochs={args.epochs:g}" + (f", max_steps={args.max_steps}" if args.max_steps else "")
          + f", batch size {args.batch_size}, max length {args.max_length}, seed {args.seed}",
          f"* total wall time {wall_s:.1f} s", "",
          markdown_table(results), ""]
    ratio = ratios(results)
    if ratio:
        md += [ratio, ""]
    md += ["Trainable parameters and the adapter file include the classification head, which PEFT trains and "
           "saves for `task_type=SEQ_CLS`. Optimizer state is the bytes of AdamW's state tensors. Train time covers "
           "the optimisation steps only (no loading, tokenisation or evaluation); for AutoLoRA it is search + "
           "retrain, and time / step is the retrained LoRA's (the search step in brackets). Peak memory is the "
           "process's resident-memory high-water mark during that method's run (reset before each run on Linux).",
           ""]
    if figures:
        md += ["Figures: " + ", ".join(f"[{p.name}]({p.name})" for p in figures), ""]
    md_path = output_dir / "results.md"
    md_path.write_text("\n".join(md), encoding="utf-8")
    return json_path, md_path


def moving_average(curve: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Per-step losses are noisy with small batches; the figure shows their trailing mean (raw data in JSON)."""
    out = []
    for i, (step, _) in enumerate(curve):
        chunk = [loss for _, loss in curve[max(0, i - window + 1) : i + 1]]
        out.append((step, sum(chunk) / len(chunk)))
    return out


def write_figures(output_dir: Path, runs: dict[str, Any]) -> list[Path]:
    """Loss curves of every method; rank heat maps and rank histories where ranks differ or change."""
    from peft_lowrank_ext.train.plots import (plot_loss_curves, plot_rank_heatmap, plot_rank_history,
                                              plot_sparsity_history)

    figures: list[Path] = []
    curves = {name: curve for run in runs.values() for name, curve in run.curves.items() if curve}
    if curves:
        window = max(1, max(len(c) for c in curves.values()) // 30)
        title = "training loss" + (f" (moving average of {window} steps)" if window > 1 else "")
        smoothed = {name: moving_average(curve, window) for name, curve in curves.items()}
        figures.append(plot_loss_curves(smoothed, output_dir / "loss_curves.png", title=title))
    for method, run in runs.items():
        if run.ranks:
            figures.append(plot_rank_heatmap(run.ranks, output_dir / f"ranks_{method}.png",
                                             title=f"{method}: rank per layer and module"))
        if run.rank_history:
            figures.append(plot_rank_history(run.rank_history, output_dir / f"rank_history_{method}.png",
                                             title=f"{method}: ranks during training"))
        if getattr(run, "sparsity_history", None):
            figures.append(plot_sparsity_history(run.sparsity_history, output_dir / f"sparsity_history_{method}.png",
                                                 title=f"{method}: sparsity of A during training"))
    return figures
