"""Step time and peak memory of every method against PEFT LoRA as the model grows and as r grows.

    python bench/scaling.py                         # both sweeps (CPU: tens of minutes on 2 cores)
    python bench/scaling.py --sweeps rank --ranks 4 8 16
    python bench/scaling.py --models llama-tiny llama-7b-block --timed-steps 2
    python bench/scaling.py --sweeps model --models minilm llama-1b --methods lora rlora \
        --batch 16 --seq 64      # RLoRA vs LoRA: parameters, adapter file, Adam state, memory, step time

Models are Llama stacks built from a config with random weights (causal LM, adapters on
``q_proj``/``v_proj``): ``llama-tiny`` (hidden 256, 4 layers), ``llama-mid`` (hidden 768, 12 layers),
``llama-1b`` (the 1.1B shape: hidden 2048, 22 layers, vocabulary 32000) and ``llama-7b-block``
(one decoder block of the 7B shape: hidden 4096, intermediate 11008, 32 heads, with a small
vocabulary so that the block dominates). The rank sweep uses ``llama-7b-block``, where r·(d_in+d_out)
is largest. ``minilm`` (the packaged pretrained all-MiniLM-L6-v2 as a sequence classifier, adapters on
``query``/``value``) is measured only when named in ``--models``. Methods, all at the same rank r on
the same targets (configs from :func:`peft_lowrank_ext.cli.recipes.peft_config`):

* ``lora`` — PEFT LoRA;
* ``rlora`` — RLoRA at projection ratio 0.05 with the PAC-Bayes term (weight 0.1);
* ``autolora`` — an AutoLoRA *search* step (the authors' ``darts_real_step`` hypergradient on one held-out batch);
* ``prilora`` — PRILoRA with pruning statistics gathered and a pruning event every step;
* ``heterolora`` — HeteroLoRA after allocation (half of the candidates on).

Each (model, method) — and each method's whole rank sweep — runs in a fresh worker process, so
peak memory is its own. Every point also records the trainable parameters, the size of the saved
``adapter_model.safetensors`` and the optimizer state after the first step. Step = forward + backward + AdamW step with the method's hooks, batch
``--batch`` × ``--seq`` tokens, median of ``--timed-steps`` after ``--warmup`` untimed steps.
Writes ``bench/results/scaling.json`` (after every measurement), ``scaling_model.png``,
``scaling_rank.png`` and ``scaling.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/scaling.py`: import from the repository root, not from bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench import common  # noqa: E402
from peft_lowrank_ext.cli.recipes import METHODS  # noqa: E402

common.offline()
LLAMAS: dict[str, dict[str, Any]] = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=4096),
    "llama-mid": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=4096),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000),
    "llama-7b-block": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=1024),
}
MINILM = "minilm"  # the packaged pretrained all-MiniLM-L6-v2, a sequence classifier (only when asked for)
MODELS: dict[str, dict[str, Any]] = {**LLAMAS, MINILM: {"packaged": "all-MiniLM-L6-v2", "num_labels": 2}}
TARGETS = ["q_proj", "v_proj"]


def method_settings(method: str, r: int) -> dict[str, Any]:
    """What a method's config sets besides r / alpha / targets (every other setting: the config's default)."""
    return {
        "lora": {},
        "rlora": dict(projection_ratio=0.05, pac_bayes_weight=0.1, num_train_examples=1000),
        "autolora": dict(hypergradient="darts_real_step"),  # a search step: the authors' hypergradient
        "prilora": dict(r_first=r, r_last=r, prune_every=1, prune_start=0, prune_end=10**6, final_sparsity=0.5),
        "heterolora": dict(budget=0.5, proxy="grad_norm", proxy_batches=1),
    }[method]


# Why a method's step can grow faster than LoRA's (used in the findings next to the measured ratios).
WHY = {
    "rlora": "RLoRA regenerates A and B from z every step: two Walsh–Hadamard transforms of length "
             "L = 2^⌈log2 r·(d_in+d_out)⌉ per module forward and again backward, O(L log L) per module per step "
             "whatever the batch. LoRA's extra work is O(tokens · r · (d_in+d_out)), so RLoRA's overhead "
             "grows with r and width and is amortised only by many tokens per step (here batch 1 × short "
             "sequences, the worst case).",
    "autolora": "An AutoLoRA search step adds a forward/backward pass of a held-out batch (first order) plus two "
                "more for the finite-difference Hessian-vector product (darts_real_step): three to four times a LoRA "
                "step at every size and rank, by construction, plus a weight copy for the look-ahead (memory "
                "grows with r like LoRA's). Measured ratios far from that band are load noise.",
    "prilora": "PRILoRA's gated layer keeps A and B at full size r for the whole run (pruning is a mask, shapes "
               "never change), adds the element mask multiply and the per-feature input EMA (one extra pass over "
               "the layer input), and pruning events sort |A|·√n per row: costs that grow with r·d_in.",
    "heterolora": "HeteroLoRA's gated layer computes all r ranks of every switched-on module and keeps the "
                  "switched-off candidates in the model (their forward is skipped only by a zero gate); the "
                  "allocation hook itself is cheap after the scoring window.",
}


# ----- one measurement ------------------------------------------------------------------------------
def build_model(name: str, dtype):
    """``(model, targets, task_type, vocab_size)`` of a ``MODELS`` entry."""
    if name == MINILM:
        from peft_lowrank_ext.train.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(None, MODELS[MINILM]["num_labels"])
        return model, ["query", "value"], "SEQ_CLS", model.config.vocab_size
    model, config = common.build_llama(dtype, **LLAMAS[name], max_position_embeddings=2048, rms_norm_eps=1e-5)
    return model, TARGETS, "CAUSAL_LM", config.vocab_size


def method_config(method: str, r: int, targets: list[str] = TARGETS, task_type: str = "CAUSAL_LM"):
    from peft_lowrank_ext.cli.recipes import peft_config

    if method not in METHODS:
        raise ValueError(f"--methods: {method!r} is not allowed; choose from {', '.join(METHODS)}")
    return peft_config(method, r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type,
                       **method_settings(method, r))


def measure(model_name: str, method: str, r: int, args) -> dict[str, Any]:
    import torch
    from peft import get_peft_model

    import peft_lowrank_ext  # noqa: F401
    from peft_lowrank_ext.train.measure import count_parameters, optimizer_state_bytes
    from peft_lowrank_ext.train.run import save_adapter

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    common.reset_peak_rss()
    t0 = time.perf_counter()
    base, targets, task_type, vocab = build_model(model_name, dtype)
    model = get_peft_model(base, method_config(method, r, targets, task_type))
    build_s = time.perf_counter() - t0
    model.train()
    trainable, total = count_parameters(model)
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(5, vocab, (args.batch, args.seq), generator=gen)
        labels = torch.randint(0, 2, (args.batch,), generator=gen) if task_type == "SEQ_CLS" else ids.clone()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    inputs = batch()
    if method == "autolora":
        from peft_lowrank_ext import AutoLoraSearch

        AutoLoraSearch([batch()]).attach(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        t = time.perf_counter()
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(args.warmup):
            step()
            if i == 0:
                opt_bytes = optimizer_state_bytes(opt)  # the first step allocates the optimizer state
        rss_before = common.rss_bytes()
        peak_with_build = common.peak_rss_bytes()
        common.reset_peak_rss()
        times = [step() for _ in range(args.timed_steps)]
    peak = common.peak_rss_bytes()
    adapter_bytes, _ = save_adapter(model, None)
    return {
        "model": model_name, "method": method, "r": r, "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq,
        "targets": targets, "task_type": task_type, "trainable_params": trainable, "total_params": total,
        "adapter_bytes": adapter_bytes, "optimizer_state_bytes": opt_bytes,
        "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_all": times,
        "rss_before_steps_bytes": rss_before, "peak_rss_bytes": peak, "peak_rss_with_build_bytes": peak_with_build,
        "step_peak_over_base_bytes": (peak - rss_before) if peak and rss_before else None,
        "build_s": build_s, "torch_threads": torch.get_num_threads(), "load_average": common.load_average(),
        "niceness": os.nice(0) if hasattr(os, "nice") else None, "finished_at": common.now_iso(),
    }


def cost_table(runs: list[dict[str, Any]]) -> str:
    """Parameters, adapter file, Adam state, memory and step time per (model, method), and each method's
    ratios to LoRA on the same model at the same r (the former bench/rlora_vs_lora.py table)."""
    ok = [r for r in runs if "error" not in r and "adapter_bytes" in r]
    if not ok:
        return ""
    hb = common.human_bytes
    head = ["model", "method", "r", "trainable params", "adapter file", "Adam state", "RSS before steps",
            "peak RSS in steps", "step time (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":--", ":--"] + ["--:"] * (len(head) - 2)) + "|"]
    for r in ok:
        lines.append("| " + " | ".join([
            r["model"], r["method"], str(r["r"]), f"{r['trainable_params']:,}", hb(r["adapter_bytes"]),
            hb(r["optimizer_state_bytes"]), hb(r["rss_before_steps_bytes"]), hb(r["peak_rss_bytes"]),
            f"{1000 * r['step_s_median']:.0f} ms"]) + " |")
    lora = {(r["model"], r["r"]): r for r in ok if r["method"] == "lora"}
    notes = []
    for r in ok:
        b = lora.get((r["model"], r["r"]))
        if b and r["method"] != "lora":
            notes.append(f"* {r['model']} r={r['r']}: {r['method']}/LoRA trainable params "
                         f"{r['trainable_params'] / b['trainable_params']:.3f}x, adapter file "
                         f"{r['adapter_bytes'] / b['adapter_bytes']:.3f}x, Adam state "
                         f"{r['optimizer_state_bytes'] / b['optimizer_state_bytes']:.3f}x, step time "
                         f"{r['step_s_median'] / b['step_s_median']:.2f}x")
    return "\n".join(lines + [""] + notes)


# ----- findings and plots ---------------------------------------------------------------------------
def _ratios(runs: list[dict[str, Any]], sweep: str, key: str) -> dict[str, list[tuple[Any, float]]]:
    ok = [r for r in runs if r.get("sweep") == sweep and "error" not in r]
    lora = {(r["model"], r["r"]): r for r in ok if r["method"] == "lora"}
    out: dict[str, list[tuple[Any, float]]] = {}
    for r in ok:
        ref = lora.get((r["model"], r["r"]))
        if r["method"] != "lora" and ref:
            x = r["r"] if sweep == "rank" else r["model"]
            out.setdefault(r["method"], []).append((x, r[key] / ref[key]))
    return out


def findings(runs: list[dict[str, Any]], model_order: list[str]) -> list[str]:
    """One line per method and sweep: its step-time ratio to LoRA at the two ends, and why it moves."""
    lines = []
    size = {r["model"]: r["total_params"] for r in runs if "total_params" in r}
    loads = [r["load_average"][0] for r in runs if r.get("load_average")]
    if loads and max(loads) > 1.5 * min(loads) + 0.5:
        lines.append(f"Caution: the 1-minute load moved between {min(loads):.1f} and {max(loads):.1f} during these "
                     "measurements (column *load*), and each point is a separate process measured at a different time, "
                     "so a ratio below 1 is a load artefact (no method does less work per step than LoRA at the same "
                     "r) and only large, monotone trends carry information. The reasons below follow from what each "
                     "method computes per step.")
        lines.append("")
    for sweep, unit in (("model", "model"), ("rank", "r")):
        ratios = _ratios(runs, sweep, "step_s_min")
        for method, pts in ratios.items():
            if sweep == "model":
                pts = sorted(pts, key=lambda p: size.get(p[0], 0))
            else:
                pts = sorted(pts)
            if len(pts) < 2:
                continue
            (x0, a), (x1, b) = pts[0], pts[-1]
            monotone = all(v2 >= v1 for (_, v1), (_, v2) in zip(pts, pts[1:]))
            trend = ("grows faster than LoRA's" + ("" if monotone else " (not monotone: noisy)") if b > a * 1.15 else
                     "grows more slowly than LoRA's" if b < a / 1.15 else "grows like LoRA's (within 15%)")
            series = ", ".join(f"{x}: {v:.2f}×" for x, v in pts)
            lines.append(f"* **{method}**, {unit} sweep: fastest step vs LoRA's {series} — cost {trend}. "
                         + (WHY[method] if b > a * 1.15 or method == "autolora" else ""))
    return lines


def plot(runs: list[dict[str, Any]], sweep: str, path: Path, model_order: list[str]) -> bool:
    ok = [r for r in runs if r.get("sweep") == sweep and "error" not in r]
    if not ok:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    base_size = {}  # one x per model: its frozen size (total minus what the method adds as trainable)
    for r in ok:
        base_size[r["model"]] = min(base_size.get(r["model"], r["total_params"]), r["total_params"] - r["trainable_params"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        pts = [r for r in ok if r["method"] == method]
        if not pts:
            continue
        if sweep == "model":
            pts.sort(key=lambda r: base_size[r["model"]])
            xs = [round(base_size[r["model"]] / 1e6) for r in pts]
        else:
            pts.sort(key=lambda r: r["r"])
            xs = [r["r"] for r in pts]
        style = dict(marker="o", label=method, linewidth=2.5 if method == "lora" else 1.5,
                     color="black" if method == "lora" else None)
        axes[0].plot(xs, [r["step_s_min"] for r in pts], **style)
        axes[1].plot(xs, [(r["peak_rss_bytes"] or 0) / 2**30 for r in pts], **style)
    xlabel = "model parameters (millions, log)" if sweep == "model" else "rank r (log)"
    ticks = sorted({r["r"] if sweep == "rank" else round(base_size[r["model"]] / 1e6) for r in ok})
    for ax, ylabel in zip(axes, ("fastest timed step (s, log)", "peak RSS during steps (GiB)")):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" if sweep == "rank" else f"{t:.0f}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0].legend()
    title = ("vs model size (" + ", ".join(dict.fromkeys(r["model"] for r in sorted(ok, key=lambda r: r["total_params"])))
             + ")" if sweep == "model" else f"vs r on {ok[0]['model']}")
    fig.suptitle(f"Step time and peak memory {title}; CPU, batch {ok[0]['batch']}×{ok[0]['seq_len']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----- driver ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Step time and peak memory vs model size and vs r, each method vs LoRA.")
    p.add_argument("--sweeps", nargs="+", choices=("model", "rank"), default=["model", "rank"])
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(LLAMAS),
                   help=f"models of the model sweep (default: {' '.join(LLAMAS)}; {MINILM} only when named)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--r", type=int, default=8, help="rank of the model sweep (default 8)")
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 16, 64])
    p.add_argument("--rank-model", choices=tuple(MODELS), default="llama-7b-block")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--timed-steps", type=int, default=2)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no new measurement after this many seconds (what was skipped is recorded)")
    p.add_argument("--render-only", action="store_true",
                   help="measure nothing: redo plots, findings and scaling.md from an existing scaling.json")
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("r", "batch", "seq", "warmup", "timed_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be a positive integer, got {getattr(args, name)}")
    if any(r < 1 for r in args.ranks):
        p.error(f"argument --ranks: every rank must be a positive integer, got {args.ranks}")
    return args


def worker(args) -> int:
    """``--worker sweep:model:method``: one model sweep point, or a whole rank sweep of one method."""
    import torch

    torch.set_num_threads(args.threads)
    sweep, model_name, method = args.worker.split(":")
    ranks = [args.r] if sweep == "model" else args.ranks
    for r in ranks:
        try:
            row = measure(model_name, method, r, args)
        except Exception as e:  # noqa: BLE001 - record the failure, keep the others
            row = {"model": model_name, "method": method, "r": r, "error": f"{type(e).__name__}: {e}"}
        row["sweep"] = sweep
        print("RESULT " + json.dumps(row), flush=True)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    started, load_start = common.now_iso(), common.load_average()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "scaling.json"
    model_order = list(MODELS)
    runs: list[dict[str, Any]] = []
    stopped: dict[str, Any] = {}
    jobs = []
    small = [m for m in args.models if m != "llama-1b"]
    if "model" in args.sweeps:
        jobs += [f"model:{m}:{meth}" for m in small for meth in args.methods]
    if "rank" in args.sweeps:
        jobs += [f"rank:{args.rank_model}:{meth}" for meth in args.methods]
    if "model" in args.sweeps and "llama-1b" in args.models:  # the slowest points last
        jobs += [f"model:llama-1b:{meth}" for meth in args.methods]
    if args.render_only:
        return render_only(json_path, model_order)
    models_used = sorted({j.split(":")[1] for j in jobs}, key=model_order.index)

    def save(finished=False):
        plots = {}
        for sweep in ("model", "rank"):
            if finished and plot(runs, sweep, args.output_dir / f"scaling_{sweep}.png", model_order):
                plots[sweep] = f"scaling_{sweep}.png"
        payload = {
            "schema": "peft-lowrank-ext/scaling/1", "command": "python bench/scaling.py" + (
                " " + " ".join(argv) if argv else ""), "argv": argv,
            "date_start": started, "date_end": common.now_iso() if finished else None, "finished": finished,
            "machine": common.machine_info(args.threads),
            "load_average": {"start": load_start, "end": common.load_average()},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
            "models": {m: {"config": MODELS[m], "description": _describe(m), "batch": args.batch, "seq_len": args.seq,
                           "warmup": args.warmup, "steps": args.timed_steps, "dtype": args.dtype} for m in models_used},
            "runs": runs, "plots": plots, "stopped_early": stopped or None,
            "findings": findings(runs, model_order) if finished else [],
        }
        json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    t_start = time.perf_counter()
    for i, job in enumerate(jobs):
        if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            stopped.update(reason=f"--time-budget {args.time_budget:g} s used up", not_run=jobs[i:])
            print(f"[scaling] stopping early: {stopped['reason']}", file=sys.stderr, flush=True)
            break
        print(f"[scaling] {job} (load {common.load_average()})", file=sys.stderr, flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", job]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                runs.append(json.loads(line[len("RESULT "):]))
                r = runs[-1]
                print(f"[scaling]   r={r['r']}: " + (f"FAILED {r['error']}" if "error" in r else
                      f"step {1000 * r['step_s_median']:.0f} ms, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB"),
                      file=sys.stderr, flush=True)
                save()
        if proc.wait() != 0:
            _, model_name, method = job.split(":")
            runs.append({"sweep": job.split(":")[0], "model": model_name, "method": method, "r": None,
                         "error": f"worker exited with {proc.returncode}"})
    save(finished=True)
    _write_markdown(json_path)
    return 0 if all("error" not in r for r in runs) else 1


def _write_markdown(json_path: Path) -> None:
    from bench import render_results

    payload = json.loads(json_path.read_text(encoding="utf-8"))
    md = render_results.render_scaling(payload)
    costs = cost_table(payload["runs"])
    if costs:
        md = md.rstrip("\n") + "\n\n## Parameters, adapter file and optimizer state\n\n" + costs + "\n"
    json_path.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)


def render_only(json_path: Path, model_order: list[str]) -> int:
    """Plots, findings and Markdown from the measurements already in ``json_path`` (e.g. a stopped run)."""
    payload = json.loads(json_path.read_text(encoding="utf-8"))
    runs = payload["runs"]
    payload["plots"] = {sweep: f"scaling_{sweep}.png" for sweep in ("model", "rank")
                        if plot(runs, sweep, json_path.parent / f"scaling_{sweep}.png", model_order)}
    payload["findings"] = findings(runs, model_order)
    if not payload.get("finished") and payload.get("date_end") is None:
        payload["date_end"] = max((r["finished_at"] for r in runs if r.get("finished_at")), default=None)
    json_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    _write_markdown(json_path)
    return 0


def _describe(name: str) -> str:
    if name == MINILM:
        return "the packaged pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) as a sequence classifier"
    c = MODELS[name]
    h, head_dim = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    n_block = 2 * h * h + 2 * h * c["num_key_value_heads"] * head_dim + 3 * h * c["intermediate_size"]
    approx = c["num_hidden_layers"] * n_block + 2 * c["vocab_size"] * c["hidden_size"]
    return (f"Llama from a config, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
            f"{c['num_hidden_layers']} layer(s), {c['num_attention_heads']} heads ({c['num_key_value_heads']} KV), "
            f"vocabulary {c['vocab_size']}, ≈{approx / 1e6:.0f}M parameters, random weights")


if __name__ == "__main__":
    sys.exit(main())
