"""`--task causal-lm`: SFT with TRL's SFTTrainer(peft_config=...) on a tiny Llama saved to a folder (offline)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from models import tiny_llama
from peft_lowrank_ext.cli import main as cli
from trainer_utils import make_tokenizer, text_dataset


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-sft")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(d / "llama")
    make_tokenizer().save_pretrained(d / "llama")
    path = d / "texts.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "other"])
        w.writerows([t, 0] for t in text_dataset(24, seed=1)["text"])
    return {"model": d / "llama", "train": path}


def test_causal_lm_compare_with_sft_trainer(tiny_lm, tmp_path, capsys):
    out = tmp_path / "lm"
    assert cli.main(["compare", "--task", "causal-lm", "--methods", "lora", "rlora", "autolora",
                     "--model", str(tiny_lm["model"]), "--train-file", str(tiny_lm["train"]), "--text-column", "body",
                     "--max-steps", "2", "--batch-size", "4", "--max-length", "16", "--r", "2", "--no-progress",
                     "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["task"] == "causal-lm" and data["data"]["train_rows"] == 19  # 20% of 24 held out for evaluation
    for r in data["results"]:
        assert r["steps"] == 2 and math.isfinite(r["eval_loss"])
        assert r["extra"]["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
        assert r["extra"]["target_modules"] and len(r["loss_curve"]) == 2
        saved = json.loads((out / r["method"] / "adapter_config.json").read_text())
        assert saved["task_type"] == "CAUSAL_LM"
        assert saved["peft_type"] == {"autolora": "LORA"}.get(r["method"], r["method"].upper())
    assert data["results"][2]["extra"]["search"]["held_out_rows"] == 6  # AutoLoRA's β learned on 30% of 19
    assert "| method" in stdout and "perplexity" in stdout and "eval loss" in stdout
    assert (out / "loss_curves.png").is_file() and (out / "ranks_autolora.png").is_file()


def test_causal_lm_needs_a_model_and_a_text_column(tiny_lm, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--method", "lora", "--task", "causal-lm", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "argument --model: --task causal-lm needs --model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--method", "lora", "--task", "causal-lm", "--model", str(tiny_lm["model"]),
                  "--train-file", str(tiny_lm["train"]), "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "text_column (--text-column): causal-LM fine-tuning needs a text column; 'text' not found" in err
    assert "['body', 'other']" in err
