"""The benchmark scripts end to end at toy size: compare_methods writes the JSON the renderer reads.

A 2-layer BERT built from a config and 48 easy rows; two methods (PEFT AdaLoRA, whose per-step
``update_and_allocate`` must be driven by the step hooks, and RLoRA), two seeds, two steps each.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from test_training import easy_rows, save_tiny_bert, write_csv

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved  # the scripts put the repository root first; leave pytest's path alone
    return module


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-smoke")
    model = save_tiny_bert(root / "tiny-bert")
    train = write_csv(root / "train.csv", easy_rows(48, seed=1))
    evald = write_csv(root / "eval.csv", easy_rows(16, seed=2))
    out = root / "results"
    argv = ["--model", str(model), "--train-file", str(train), "--eval-file", str(evald),
            "--methods", "adalora", "rlora", "--seeds", "0", "1", "--max-steps", "2", "--batch-size", "8",
            "--in-process", "--output-dir", str(out)]
    code = _module("compare_methods").main(argv)
    return code, out, json.loads((out / "compare.json").read_text(encoding="utf-8"))


def test_compare_json_has_every_raw_number_and_the_provenance(compare_run):
    code, out, payload = compare_run
    assert code == 0
    assert payload["schema"] == "peft-lowrank-ext/compare/1" and payload["finished"] is True
    assert payload["command"].startswith("python bench/compare_methods.py --model ")
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "peft", "transformers", "hostname"):
        assert payload["machine"][key] not in (None, ""), key
    assert len(payload["load_average"]["start"]) == 3 and len(payload["load_average"]["end"]) == 3
    assert payload["date_start"] <= payload["date_end"]
    assert payload["data"]["train_rows"] == 48 and payload["data"]["eval_rows"] == 16

    runs = payload["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("adalora", 0), ("rlora", 0), ("adalora", 1), ("rlora", 1)]
    for r in runs:
        assert "error" not in r, r.get("error")
        assert r["steps"] == 2 and 0.0 <= r["accuracy"] <= 1.0
        assert r["trainable_params"] > 0 and r["adapter_bytes"] > 0 and r["median_step_s"] > 0
        assert r["peak_rss_bytes"] > 0 and len(r["load_average_start"]) == 3
    # AdaLoRA's allocation really ran once per optimizer step, with total_step set to the run's length.
    ada = [r for r in runs if r["method"] == "adalora"]
    assert all(r["adalora_update_and_allocate_calls"] == 2 for r in ada)
    assert all(r["settings"]["config"]["total_step"] == 2 for r in ada)
    # RLoRA trains a small vector per module: far fewer parameters than AdaLoRA's r=12 start.
    by = payload["summary"]
    assert by["rlora"]["trainable_params"] < by["adalora"]["trainable_params"]
    for s in by.values():
        assert s["n_seeds"] == 2 and s["accuracy_min"] <= s["accuracy_median"] <= s["accuracy_max"]
    assert (out / "compare.md").read_text(encoding="utf-8").count("\n| ") >= 3


def test_render_fills_the_readme_section_from_the_json_only(compare_run, tmp_path):
    _, out, payload = compare_run
    render = _module("render_results")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n\n{render.START}\nstale text\n{render.END}\n\nafter\n", encoding="utf-8")
    written = render.render_all(out, readme)
    assert readme in written and out / "compare.md" in written
    text = readme.read_text(encoding="utf-8")
    assert "stale text" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("\nafter\n")
    section = text.split(render.START)[1].split(render.END)[0]
    assert payload["command"] in section and payload["date_start"] in section
    assert f"{int(payload['summary']['rlora']['trainable_params']):,}" in section
    assert "GPU numbers are pending" in section
    assert "scaling benchmark has not been run" in section  # no scaling.json in this folder
    # rendering twice gives the same file (the markers survive)
    render.render_all(out, readme)
    assert readme.read_text(encoding="utf-8") == text


def test_render_refuses_a_readme_without_markers(compare_run, tmp_path):
    _, out, _ = compare_run
    render = _module("render_results")
    readme = tmp_path / "README.md"
    readme.write_text("# no markers here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bench-results:start"):
        render.render_all(out, readme)


def test_compare_rejects_an_unknown_method():
    with pytest.raises(SystemExit):
        _module("compare_methods").parse_args(["--methods", "lora_r3"])


def test_kernels_bench_dry_run_goes_through_every_step_without_peft(tmp_path):
    """The prepared GPU script, CUDA-less at tiny sizes, in a fresh interpreter: every check and timing section
    runs, the checks pass, JSON and Markdown are written, and neither PEFT nor transformers is imported (the lent
    GPU machine has its own versions of both)."""
    import subprocess

    proc = subprocess.run([sys.executable, str(BENCH / "kernels_bench.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert list(result["sections"]) == ["check_fwht", "check_fastfood", "check_masked", "fwht", "masked", "fastfood"]
    assert result["checks_ok"] and not result["skipped"] and result["foreign_imports"] == []
    checks = [c for name, rows in result["sections"].items() if name.startswith("check_") for c in rows]
    assert {c["dtype"] for c in checks} == {"fp32", "fp16", "bf16"} and all(c["error"] < c["tolerance"] for c in checks)
    for row in result["sections"]["masked"]:
        assert all(row[k]["median_ms"] > 0 and row[k]["n"] > 0 for k in ("triton", "aten", "cublas", "addmm_"))
    markdown = (tmp_path / "kernels.md").read_text()
    assert "CPU dry run, not a measurement" in markdown and "## Masked low-rank product" in markdown


def test_kernels_bench_budget_skips_sections_and_says_so(tmp_path):
    kernels_bench = _module("kernels_bench")
    result = kernels_bench.run(tmp_path, dry_run=True, budget_s=0.0)
    assert result["sections"] == {} and not result["checks_ok"]  # nothing checked is not "checks passed"
    assert result["skipped"] == ["check_fwht", "check_fastfood", "check_masked", "fwht", "masked", "fastfood"]
    assert "Skipped (time budget)" in (tmp_path / "kernels.md").read_text()


def test_device_run_dry_run_goes_through_both_benches(tmp_path):
    """The one prepared device call (``bench/device_run.sh``), CUDA-less: the kernel run and the training-step
    run (every method against LoRA on a tiny Llama, the 7B estimate from two truncated models) both finish
    and write their results, and a CPU run claims no goal."""
    import os
    import subprocess

    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(BENCH / "device_run.sh")], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "kernels_bench rc=0 train_step_bench rc=0" in proc.stdout
    kernels = json.loads((tmp_path / "kernels" / "kernels.json").read_text())
    assert kernels["checks_ok"] and kernels["dry_run"]
    steps = json.loads((tmp_path / "train_step" / "train_step.json").read_text())
    rows = steps["sections"]["step_1b"]
    assert [r["method"] for r in rows] == ["lora", "rlora", "prilora", "heterolora", "autolora_search"]
    assert all(r["median_ms"] > 0 and r["trainable"] > 0 and r["goal"] is None for r in rows)
    assert rows[0]["time_vs_lora"] == 1.0 and rows[1]["trainable"] < rows[0]["trainable"]  # RLoRA trains only z
    estimate = steps["sections"]["step_7b"]
    assert estimate["lora_step_estimate_ms"] > 0 and estimate["fastfood_ms"] > 0 and estimate["goal"] is None
    markdown = (tmp_path / "train_step" / "train_step.md").read_text()
    assert "CPU dry run, not a measurement" in markdown and "no claim" in markdown and "| met |" not in markdown
    assert (tmp_path / "machine.txt").exists()
