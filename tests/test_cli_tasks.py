"""The command line with sentence pairs, regression, label remapping and headerless TSV files."""

from __future__ import annotations

import json

import pytest

from peft_lowrank_ext.cli import main as cli
from test_data_tasks import pair_rows, regression_rows
from test_training import save_tiny_bert, write_csv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("cli-tasks-model"))


def _run(model, out, *extra):
    return cli.main(["train", "--method", "lora", "--model", str(model), "--max-steps", "2", "--batch-size", "8",
                     "--r", "4", "--no-progress", "--output-dir", str(out), *extra])


def _error(capsys, argv_fn) -> str:
    with pytest.raises(SystemExit) as exc:
        argv_fn()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    return line


def test_sentence_pairs(model, tmp_path, capsys):
    f = write_csv(tmp_path / "pairs.csv", pair_rows(24, 1), header=("sentence1", "sentence2", "label"))
    line = _error(capsys, lambda: _run(model, tmp_path / "a", "--train-file", str(f), "--text-column", "sentence1"))
    assert "--text-column" in line and "--text-pair-column sentence2" in line and "'sentence2'" in line
    assert _run(model, tmp_path / "b", "--train-file", str(f), "--text-column", "sentence1",
                "--text-pair-column", "sentence2") == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["data"]["sentence_pairs"] is True and data["settings"]["text_pair_column"] == "sentence2"
    assert _run(model, tmp_path / "c", "--train-file", str(f), "--text-column", "sentence1", "--ignore-text-pair") == 0
    assert json.loads((tmp_path / "c" / "results.json").read_text())["data"]["sentence_pairs"] is False


def test_regression_auto_and_explicit(model, tmp_path, capsys):
    f = write_csv(tmp_path / "scores.csv", regression_rows(24, 1), header=("sentence", "score"))
    common = ("--train-file", str(f), "--text-column", "sentence", "--label-column", "score")
    assert _run(model, tmp_path / "auto", *common) == 0
    captured = capsys.readouterr()
    assert "task: regression (auto:" in captured.err
    assert "| pearson" in captured.out and "spearman" in captured.out and "accuracy" not in captured.out
    data = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert data["task"] == "regression" and data["data"]["num_labels"] == 1
    (r,) = data["results"]
    assert r["task"] == "regression" and -1 <= r["pearson"] <= 1 and -1 <= r["spearman"] <= 1
    line = _error(capsys, lambda: _run(model, tmp_path / "cls", *common, "--task", "classification"))
    assert "--label-column" in line and "--task regression" in line
    assert _run(model, tmp_path / "reg", *common, "--task", "regression") == 0


def test_labels_with_gaps_are_refused_or_remapped(model, tmp_path, capsys):
    rows = [(a + " " + b, 7 * y) for a, b, y in pair_rows(24, 2)]
    f = write_csv(tmp_path / "gaps.csv", rows)
    line = _error(capsys, lambda: _run(model, tmp_path / "a", "--train-file", str(f)))
    assert "[0, 7]" in line and "--remap-labels" in line
    assert _run(model, tmp_path / "b", "--train-file", str(f), "--remap-labels") == 0
    assert "warning: --remap-labels" in capsys.readouterr().err
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["data"]["label_map"] == {"0": 0, "7": 1} and data["data"]["num_labels"] == 2
    huge = write_csv(tmp_path / "huge.csv", [("a good one", 0), ("a bad one", 10**12)])
    line = _error(capsys, lambda: _run(model, tmp_path / "c", "--train-file", str(huge), "--eval-file", str(huge)))
    assert "1000000000000" in line and "--remap-labels" in line


def test_headerless_tsv_with_column_names(model, tmp_path, capsys):
    f = tmp_path / "cola.tsv"
    f.write_text("".join(f"src\t{y}\t\t{t} \"quoted\n" for t, y in
                         [(a + " " + b, y) for a, b, y in pair_rows(20, 3)]), encoding="utf-8")
    assert _run(model, tmp_path / "a", "--train-file", str(f), "--text-column", "sentence",
                "--column-names", "source", "label", "original", "sentence") == 0
    line = _error(capsys, lambda: _run(model, tmp_path / "b", "--train-file", str(f), "--column-names", "a", "b"))
    assert "--column-names" in line and "2 names" in line and "4 fields" in line
