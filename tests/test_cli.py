"""The command line: `compare` and `train` end to end at tiny size for all five methods, and argument errors.

Export / inspect / push-to-hub are in test_cli_adapters.py, the config file in test_cli_config.py and
the causal-LM task in test_cli_sft.py.
"""

from __future__ import annotations

import json
import runpy
import struct
import sys
from pathlib import Path

import pytest

from peft_lowrank_ext.cli import main as cli
from peft_lowrank_ext.cli.recipes import METHODS
from test_training import easy_rows, save_tiny_bert, write_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    """A PNG signature, an IHDR chunk with a non-empty image, and an IEND chunk at the end."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    length, kind = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert kind == b"IHDR" and length == 13 and width > 50 and height > 50, (path, width, height)
    assert data[-8:-4] == b"IEND", path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    assert cli.main(["compare", *_tiny_args(tiny, out, "--projection-ratio", "0.1", "--methods", "lora", "rlora")]) == 0
    stdout = capsys.readouterr().out

    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["results"]] == ["lora", "rlora"]
    lora, rlora = data["results"]
    assert lora["steps"] == rlora["steps"] == 3
    assert data["data"] == {"source": f"{tiny['train']} + {tiny['eval']}", "train_rows": 48, "eval_rows": 16,
                            "num_labels": 2, "task": "classification", "sentence_pairs": False, "label_map": None}
    assert data["task"] == "classification"  # --task auto, resolved from the integer labels
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
    for text in ("| method", "trainable params", "adapter file", "| lora ", "| rlora ", "rlora vs LoRA"):
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
        (["--methods", "dora"], "argument --methods: invalid choice: 'dora' (choose from lora, rlora, autolora, "
                                "prilora, heterolora)"),
        (["train", "--method", "adalora"], "argument --method: invalid choice: 'adalora' (choose from lora, rlora, "
                                           "autolora, prilora, heterolora)"),
        (["--task", "seq2seq"], "argument --task: invalid choice: 'seq2seq' (choose from auto, classification, regression, "
                                "causal-lm)"),
        (["--heterolora-mode", "often"], "argument --heterolora-mode: invalid choice: 'often' (choose from static, "
                                         "dynamic)"),
        (["--heterolora-budget", "0"], "argument --heterolora-budget: must be in (0, 1]"),
        (["--prilora-final-sparsity", "1"], "argument --prilora-final-sparsity: must be in [0, 1)"),
        (["--autolora-hypergradient", "third"], "argument --autolora-hypergradient: invalid choice"),
        (["--dataset", "glue", "--train-file", "x.csv"], "--dataset) cannot be combined with --train-file"),
        (["--subset", "sst2"], "subset (--subset) needs dataset (--dataset)"),
        (["--model", "some-org/no-such-model", "--max-steps", "1"],
         "--model): cannot load a sequence-classification model and tokenizer from 'some-org/no-such-model': it is "
         "not a local folder"),
        (["--task", "causal-lm"], "argument --model: --task causal-lm needs --model"),
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
    # one line, no usage block; argparse's own errors end with the --help hint
    assert len(err.strip().splitlines()) == 1 and "usage:" not in err and "Traceback" not in err, err
    assert err.startswith("peft-lowrank-ext"), err
    if any(word in needle for word in ("must be", "invalid choice", "required")):  # argparse's own checks
        assert err.rstrip().endswith("; run with --help for the options"), err


def test_bad_columns_are_reported(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*_tiny_args(tiny, tmp_path)[:-2], "--output-dir", str(tmp_path), "--text-column", "review"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--text-column" in err and "'review' not found" in err and "['sentence', 'y']" in err


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    """``python -m peft_lowrank_ext`` is wired to cli.main (run in-process: no second interpreter start-up)."""
    monkeypatch.setattr(sys, "argv", ["peft_lowrank_ext", "compare", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("peft_lowrank_ext", run_name="__main__")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--dataset", "--subset", "--split-train", "--split-eval", "--task", "--config",
                 "--train-file", "--eval-file", "--text-column", "--label-column", "--r", "--projection-ratio",
                 "--pac-bayes-weight", "--lr", "--rlora-lr", "--epochs", "--batch-size", "--max-length", "--seed",
                 "--output-dir", "--methods", "--heterolora-mode", "--autolora-hypergradient"):
        assert flag in out, flag


@pytest.mark.parametrize("argv, needle", [(["--help"], "{compare,train,export,inspect}"),
                                          (["--version"], "peft-lowrank-ext 0."),
                                          (["train", "--help"], "--method {lora,rlora,autolora,prilora,heterolora}"),
                                          (["train", "--help"], "--push-to-hub REPO_ID"),
                                          (["export", "--help"], "ADAPTER_DIR OUTPUT_DIR"),
                                          (["inspect", "--help"], "--json")])
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


# ----- every method, end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_train_every_method(tiny, tmp_path, method):
    out = tmp_path / method
    assert cli.main(["train", "--method", method, *_tiny_args(tiny, out)]) == 0
    data = json.loads((out / "results.json").read_text())
    (res,) = data["results"]
    assert res["method"] == method and res["steps"] == 3 and 0.0 <= res["accuracy"] <= 1.0
    assert len(res["loss_curve"]) == 3 and [s for s, _ in res["loss_curve"]] == [1, 2, 3]
    saved = json.loads((out / method / "adapter_config.json").read_text())
    # AutoLoRA's final adapter is the LoRA retrained with the searched ranks; its search adapter is kept too
    expected = {"autolora": "LORA"}.get(method, method.upper())
    assert saved["peft_type"] == expected
    if method == "autolora":
        search = json.loads((out / method / "search" / "adapter_config.json").read_text())
        assert search["peft_type"] == "AUTOLORA" and search["phase"] == "selected"
        assert res["extra"]["search"]["steps"] == 3 and res["extra"]["search"]["held_out_rows"] == 15  # ceil(0.3 · 48)
        assert res["extra"]["search"]["train_rows"] == 33
    assert "| " + method in (out / "results.md").read_text()


def test_compare_all_five_methods_writes_table_json_and_figures(tiny, tmp_path, capsys):
    out = tmp_path / "all"
    assert cli.main(["compare", *_tiny_args(tiny, out, "--max-steps", "4")]) == 0
    stdout = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == list(METHODS)
    for r in results.values():
        for key in ("accuracy", "trainable_params", "adapter_bytes", "time_per_step_s", "peak_rss_bytes",
                    "optimizer_state_bytes", "train_time_s", "loss_curve"):
            assert r[key] is not None, (r["method"], key)
        assert r["steps"] == 4 and r["time_per_step_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["adapter_bytes"] == (out / r["method"] / "adapter_model.safetensors").stat().st_size
    assert data["command"] == "compare" and data["environment"]["cpu_count"] >= 1 and data["date"]

    # matched adapters: r = 4, alpha = 8 on query/value of both blocks
    head = 32 * 2 + 2
    assert results["lora"]["trainable_params"] == 4 * 4 * 64 + head
    # PRILoRA: r_mean 4 -> ranks 2 (block 0) and 6 (block 1): the same total as LoRA
    assert results["prilora"]["trainable_params"] == 2 * (2 + 6) * 64 + head
    prilora_ranks = results["prilora"]["extra"]["ranks"]
    assert {k: v for k, v in prilora_ranks.items()} == {
        "bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.value": 2,
        "bert.encoder.layer.1.attention.self.query": 6, "bert.encoder.layer.1.attention.self.value": 6}
    # HeteroLoRA: budget 0.5 of 4 candidates -> exactly 2 switched on after the scoring step
    assert sorted(results["heterolora"]["extra"]["ranks"].values()) == [0, 0, 4, 4]
    # AutoLoRA: ranks from thresholding the search, 1..r each, and the retrained LoRA has exactly them
    ranks = results["autolora"]["extra"]["ranks"]
    assert len(ranks) == 4 and all(1 <= v <= 4 for v in ranks.values())
    assert results["autolora"]["trainable_params"] == sum(v * 64 for v in ranks.values()) + head

    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| method") and "peak memory" in table[0] and "time / step" in table[0]
    assert [line.split("|")[1].strip() for line in table[1:]] == list(METHODS)
    assert "python -m peft_lowrank_ext compare" in md and "* machine:" in md and "* date:" in md
    for method in METHODS:
        assert f"| {method} " in stdout

    figures = ["loss_curves.png", "ranks_autolora.png", "ranks_prilora.png", "ranks_heterolora.png",
               "sparsity_history_prilora.png", "rank_history_heterolora.png"]
    assert sorted(data["figures"]) == sorted(figures)
    for name in figures:
        assert_valid_png(out / name)


def test_hub_dataset_offline_fails_with_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--method", "lora", "--dataset", "glue", "--subset", "sst2", "--text-column", "sentence",
                  "--no-progress", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "dataset (--dataset): cannot load 'glue' (subset 'sst2')" in line and "offline" in line, line
    assert "--train-file" in line  # says what to use instead


def test_local_dataset_folder_through_load_dataset(tiny, tmp_path):
    """--dataset also takes a local data-set folder (datasets.load_dataset), with its own splits."""
    folder = tmp_path / "ds"
    folder.mkdir()
    write_csv(folder / "train.csv", easy_rows(24, seed=3), header=("sentence", "y"))
    write_csv(folder / "test.csv", easy_rows(8, seed=4), header=("sentence", "y"))
    out = tmp_path / "out"
    args = ["train", "--method", "lora", "--model", str(tiny["model"]), "--dataset", str(folder),
            "--split-eval", "test", "--text-column", "sentence", "--label-column", "y", "--max-steps", "1",
            "--no-progress", "--output-dir", str(out)]
    assert cli.main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert (data["data"]["train_rows"], data["data"]["eval_rows"]) == (24, 8)
    with pytest.raises(SystemExit) as exc:  # a split that does not exist names the argument and the splits
        cli.main([*args[:-2], "--output-dir", str(out), "--split-eval", "validation"])
    assert exc.value.code == 2
