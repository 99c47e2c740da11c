"""The command line: `compare` and `train` end to end at tiny size, and argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_lowrank_ext import cli
from test_training import easy_rows, save_tiny_bert, write_csv


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    return {
        "model": save_tiny_bert(d / "model"),
        "train": write_csv(d / "train.csv", easy_rows(48, seed=1), header=("sentence", "y")),
        "eval": write_csv(d / "eval.csv", easy_rows(16, seed=2), header=("sentence", "y")),
    }


def _tiny_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["--model", str(tiny["model"]), "--train-file", str(tiny["train"]), "--eval-file", str(tiny["eval"]),
            "--text-column", "sentence", "--label-column", "y", "--max-steps", "3", "--batch-size", "8",
            "--r", "4", "--no-progress", "--output-dir", str(out), *extra]


def test_compare_end_to_end_writes_table_and_results(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", *_tiny_args(tiny, out, "--projection-ratio", "0.1")]) == 0
    stdout = capsys.readouterr().out

    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["results"]] == ["lora", "rlora"]
    lora, rlora = data["results"]
    assert lora["steps"] == rlora["steps"] == 3
    assert data["data"] == {"source": f"{tiny['train']} + {tiny['eval']}", "train_rows": 48, "eval_rows": 16,
                            "num_labels": 2}
    assert data["settings"]["r"] == 4 and data["settings"]["command"] == "compare"
    # matched adapters: the same targets; RLoRA trains ceil(0.1 · 4·(32+32)) = 26 numbers per module
    assert lora["extra"]["target_modules"] == rlora["extra"]["target_modules"] == ["query", "value"]
    assert lora["trainable_params"] == 4 * 4 * 64 + 66
    assert rlora["trainable_params"] == 4 * 26 + 66
    assert rlora["adapter_bytes"] < lora["adapter_bytes"]
    assert rlora["optimizer_state_bytes"] < lora["optimizer_state_bytes"]
    assert rlora["lr"] == cli.DEFAULT_RLORA_LR and rlora["head_lr"] == lora["lr"] == cli.DEFAULT_LR
    assert rlora["extra"]["pac_bayes"]["regularizer"] > 0  # on by default, n = training-set size
    for r in (lora, rlora):
        assert 0.0 <= r["accuracy"] <= 1.0
        assert (out / r["method"] / "adapter_model.safetensors").stat().st_size == r["adapter_bytes"]

    md = (out / "results.md").read_text()
    for text in ("| method", "trainable params", "adapter file", "| lora ", "| rlora ", "RLoRA vs LoRA"):
        assert text in md and text in stdout + md
    assert f"{lora['trainable_params']:,}" in stdout and f"{rlora['trainable_params']:,}" in stdout
    assert "| lora " in stdout and "| rlora " in stdout


def test_compare_is_the_default_subcommand(tiny, tmp_path):
    out = tmp_path / "default"
    assert cli.main([*_tiny_args(tiny, out, "--methods", "lora")]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["command"] == "compare" and [r["method"] for r in data["results"]] == ["lora"]


def test_train_one_method(tiny, tmp_path):
    out = tmp_path / "train"
    args = _tiny_args(tiny, out, "--pac-bayes-weight", "0", "--intrinsic-dim", "5", "--rlora-lr", "0.05")
    assert cli.main(["train", "--method", "rlora", *args]) == 0
    data = json.loads((out / "results.json").read_text())
    (res,) = data["results"]
    assert res["method"] == "rlora" and res["lr"] == 0.05
    assert res["trainable_params"] == 4 * 5 + 66
    assert "pac_bayes" not in res["extra"]
    cfg = json.loads((out / "rlora" / "adapter_config.json").read_text())
    assert cfg["intrinsic_dim"] == 5 and cfg["pac_bayes_weight"] == 0.0 and cfg["r"] == 4


def test_bundled_data_with_sample_limits(tiny, tmp_path):
    """Without --train-file the bundled review data is used (limited here, on the tiny model)."""
    out = tmp_path / "bundled"
    assert cli.main(["train", "--method", "lora", "--model", str(tiny["model"]), "--max-steps", "2",
                     "--max-train-samples", "16", "--max-eval-samples", "8", "--no-progress",
                     "--output-dir", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["data"]["source"] == "bundled review-sentiment data"
    assert (data["data"]["train_rows"], data["data"]["eval_rows"]) == (16, 8)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--r", "0"], "argument --r: must be a positive integer"),
        (["--epochs", "-1"], "argument --epochs: must be a number > 0"),
        (["--lr", "nan"], "argument --lr: must be a finite number"),
        (["--rlora-lr", "fast"], "argument --rlora-lr: must be a number"),
        (["--projection-ratio", "1.5"], "argument --projection-ratio: must be in (0, 1]"),
        (["--pac-bayes-weight", "-0.1"], "argument --pac-bayes-weight: must be a number >= 0"),
        (["--batch-size", "abc"], "argument --batch-size: must be a positive integer, got 'abc'"),
        (["--seed", "-3"], "argument --seed: must be an integer >= 0"),
        (["--methods", "dora"], "argument --methods: invalid choice: 'dora' (choose from lora, rlora)"),
        (["train", "--method", "adalora"], "argument --method: invalid choice: 'adalora' (choose from lora, rlora)"),
        (["train"], "the following arguments are required: --method"),
        (["--projection-ratio", "0.1", "--intrinsic-dim", "4"], "--intrinsic-dim: not allowed with argument --projection-ratio"),
        (["--train-file", "/nonexistent/train.csv"], "--train-file): file not found: '/nonexistent/train.csv'"),
        (["--eval-file", "x.csv"], "--eval-file) needs train_file (--train-file)"),
        (["--model", "/nonexistent/model"], "--model): cannot load"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--no-progress", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle.replace("'", "") in err.replace("'", ""), err
    assert "usage: peft-lowrank-ext" in err


def test_bad_columns_are_reported(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*_tiny_args(tiny, tmp_path)[:-2], "--output-dir", str(tmp_path), "--text-column", "review"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--text-column" in err and "'review' not found" in err and "['sentence', 'y']" in err


def test_python_dash_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "peft_lowrank_ext", "compare", "--help"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for flag in ("--model", "--train-file", "--eval-file", "--text-column", "--label-column", "--r",
                 "--projection-ratio", "--pac-bayes-weight", "--lr", "--rlora-lr", "--epochs", "--batch-size",
                 "--max-length", "--seed", "--output-dir", "--methods"):
        assert flag in run.stdout, flag


@pytest.mark.parametrize("argv, needle", [(["--help"], "{compare,train}"), (["--version"], "peft-lowrank-ext 0."),
                                          (["train", "--help"], "--method {lora,rlora}")])
def test_help_and_version(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert needle in capsys.readouterr().out


def test_markdown_table_formatting():
    row = {"method": "lora", "accuracy": 0.9125, "trainable_params": 74498, "adapter_bytes": 301520,
           "optimizer_state_bytes": 596080, "train_time_s": 25.71, "time_per_step_s": 0.1714,
           "peak_rss_bytes": 900 * 2**20}
    table = cli.markdown_table([row, {**row, "method": "rlora", "trainable_params": 4466}]).splitlines()
    assert len(table) == 4 and len({len(line) for line in table}) == 1  # aligned
    assert [c.strip() for c in table[2].split("|")[1:-1]] == [
        "lora", "91.2%", "74,498", "294.5 KiB", "582.1 KiB", "25.7 s", "171 ms", "900.0 MiB"]
    assert [c.strip() for c in table[3].split("|")[1:-1]][:3] == ["rlora", "91.2%", "4,466"]
