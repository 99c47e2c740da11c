"""examples/recipes/: each paper's GLUE recipe runs its real code path with --tiny (tiny RoBERTa, synthetic data)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_autolora_recipe_tiny_runs_search_and_retrain_with_the_paper_settings(tmp_path):
    out = recipe("autolora_glue").main(["--tiny", "--task", "mrpc", "--output-dir", str(tmp_path)])
    data = json.loads(out["path"].read_text())
    p = data["protocol"]
    assert (p["search"]["r"], p["search"]["arch_lr"], p["search"]["arch_beta1"], p["search"]["epochs"],
            p["search"]["batch_size"], p["search"]["held_out_fraction"]) == (8, 3e-4, 0.5, 20, 32, 0.3)
    assert (p["retrain"]["epochs"], p["retrain"]["lr"], p["retrain"]["batch_size"], p["retrain"]["warmup_ratio"]) == \
        (30, 1e-4, 16, 0.06)
    res = data["results"]
    assert (res["search_rows"], res["held_out_rows"]) == (33, 15)  # 70/30 of 48 training rows
    assert res["search"]["steps"] == res["retrain"]["steps"] == 2 and res["search"]["lr"] == 3e-4
    assert res["retrain"]["lr"] == 1e-4
    ranks = res["ranks"]
    assert len(ranks) == 4 and all(1 <= k <= 8 for k in ranks.values())  # query/value of 2 layers
    lora = res["retrain_lora"]
    assert lora["lora_alpha"] == 16 and lora["lora_dropout"] == 0.1
    got = {m: lora["rank_pattern"].get(m.replace(".", "\\."), lora["r"]) for m in ranks}
    assert got == ranks  # the retrained LoRA has exactly the ranks found
    assert (tmp_path / "autolora" / "adapter_model.safetensors").is_file()


def test_prilora_recipe_tiny_ranks_rise_and_a_is_pruned(tmp_path):
    out = recipe("prilora_glue").main(["--tiny", "--task", "sst2", "--output-dir", str(tmp_path)])
    ranks = out["ranks"]
    assert sorted(set(ranks.values())) == [4, 12]  # 2 layers: first 4, last 12
    assert all(k == (4 if ".layer.0." in m else 12) for m, k in ranks.items())
    assert all(s > 0.4 for s in out["sparsity"].values())  # pruned to ~50% by prune_end (step 1 of 2)
    data = json.loads(out["path"].read_text())
    assert data["protocol"]["training"] == {"epochs": 60, "lr": 5e-4, "batch_size": 16, "warmup_ratio": 0.06,
                                            "weight_decay": 0.0}


def test_rlora_recipe_tiny_on_stsb_is_a_regression(tmp_path):
    out = recipe("rlora_glue").main(["--tiny", "--task", "stsb", "--output-dir", str(tmp_path)])
    res = out["result"]
    assert res.task == "regression" and math.isnan(res.accuracy) and res.pearson is not None
    data = json.loads(out["path"].read_text())
    assert data["results"]["rlora"]["pearson"] == pytest.approx(res.pearson, nan_ok=True)
    assert data["protocol"]["training"]["head_lr"] == 4e-4 and data["protocol"]["training"]["lr_z"] == 3e-2
    assert res.trainable_params < 2000  # z vectors + a 1-output head, far below LoRA's
