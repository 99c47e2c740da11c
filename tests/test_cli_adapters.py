"""`export`, `inspect` and `train --push-to-hub` on adapters trained by the CLI at tiny size (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peft_lowrank_ext.cli import main as cli
from test_training import easy_rows, save_tiny_bert, write_csv


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One adapter per method, trained for a few steps by `compare` (PRILoRA pruned, HeteroLoRA allocated)."""
    d = tmp_path_factory.mktemp("cli-adapters")
    model = save_tiny_bert(d / "model")
    train = write_csv(d / "train.csv", easy_rows(32, seed=1))
    out = d / "runs"
    assert cli.main(["compare", "--model", str(model), "--train-file", str(train), "--max-steps", "4",
                     "--batch-size", "8", "--r", "4", "--lr", "0.05", "--no-progress", "--output-dir", str(out),
                     "--prilora-final-sparsity", "0.5"]) == 0
    return {"model": model, "train": train, **{m: out / m for m in ("lora", "rlora", "autolora", "prilora",
                                                                      "heterolora")}}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 20, (3, 6), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**_inputs()).logits, model


@pytest.mark.parametrize("method", ["rlora", "prilora", "heterolora"])
def test_export_gives_plain_lora_with_the_same_logits(trained, tmp_path, method, capsys):
    from peft.tuners.lora import LoraLayer

    out = tmp_path / f"{method}-lora"
    assert cli.main(["export", str(trained[method]), str(out)]) == 0  # base model read from the adapter config
    assert "wrote a plain PEFT LoRA adapter" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"

    original, _ = _logits(trained["model"], trained[method])
    exported, model = _logits(trained["model"], out)
    # plain PEFT classes only: every adapted layer is PEFT's own LoraLayer, nothing from this package
    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert adapted and all(type(m).__module__.startswith("peft.") for m in adapted)
    assert not any(type(m).__module__.startswith("peft_lowrank_ext") for m in model.modules())
    assert not torch.allclose(original, _logits(trained["model"], trained["lora"])[0])  # the adapter matters
    torch.testing.assert_close(exported, original, rtol=1e-5, atol=1e-6)


def test_export_layout_and_separate_head_flags(trained, tmp_path, capsys):
    """Default --layout uniform: one r, no patterns; --layout compact --head separate: patterns, head beside it."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    original, _ = _logits(trained["model"], trained["prilora"])
    uniform, compact = tmp_path / "uniform", tmp_path / "compact"
    assert cli.main(["export", str(trained["prilora"]), str(uniform)]) == 0
    assert "uniform layout" in capsys.readouterr().out
    config = json.loads((uniform / "adapter_config.json").read_text())
    assert "rank_pattern" not in config and "alpha_pattern" not in config and config["lora_alpha"] == config["r"]
    r_uniform = config["r"]
    assert config["modules_to_save"] and not (uniform / "head.safetensors").exists()

    assert cli.main(["export", str(trained["prilora"]), str(compact), "--layout", "compact", "--head", "separate"]) == 0
    assert "head.safetensors" in capsys.readouterr().out
    config = json.loads((compact / "adapter_config.json").read_text())
    assert config["rank_pattern"] and not config["modules_to_save"]
    assert r_uniform == max(config["r"], *config["rank_pattern"].values())  # the largest kept rank
    base = AutoModelForSequenceClassification.from_pretrained(trained["model"], num_labels=2)
    assert not base.load_state_dict(load_file(compact / "head.safetensors"), strict=False).unexpected_keys
    with torch.no_grad():
        exported = PeftModel.from_pretrained(base, str(compact)).eval()(**_inputs()).logits
    torch.testing.assert_close(exported, original, rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        cli.main(["export", str(trained["prilora"]), str(tmp_path / "x"), "--layout", "padded"])


def test_export_with_explicit_model_and_unexportable_adapters(trained, tmp_path, capsys):
    out = tmp_path / "x"
    assert cli.main(["export", str(trained["rlora"]), str(out), "--model", str(trained["model"])]) == 0
    capsys.readouterr()
    # a plain LoRA adapter (also AutoLoRA's retrained result) has nothing to export: status 1, one line
    assert cli.main(["export", str(trained["lora"]), str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "export: error:" in err and "already a plain PEFT LoRA adapter" in err
    assert not (tmp_path / "y").exists()
    # not an adapter folder: an argument error naming ADAPTER_DIR
    with pytest.raises(SystemExit) as exc:
        cli.main(["export", str(tmp_path), str(tmp_path / "z")])
    assert exc.value.code == 2 and "argument ADAPTER_DIR: no adapter_config.json" in capsys.readouterr().err


def test_export_refuses_heterolora_with_a_switched_on_shortcut(trained, tmp_path, capsys):
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from peft_lowrank_ext import HeteroLoraConfig, heterolora_score

    base = AutoModelForSequenceClassification.from_pretrained(trained["model"], num_labels=2)
    model = get_peft_model(base, HeteroLoraConfig(r=2, target_modules=["query"], shortcuts=["residual_1"],
                                                  budget=1.0, proxy_batches=1, task_type="SEQ_CLS"))
    heterolora_score(model, [{**_inputs(), "labels": torch.tensor([0, 1, 0])}])  # budget 1: everything on
    model.save_pretrained(tmp_path / "hetero")
    assert cli.main(["export", str(tmp_path / "hetero"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot be exported to plain LoRA" in err and "shortcut" in err


def test_inspect_text_and_json(trained, capsys):
    assert cli.main(["inspect", str(trained["prilora"])]) == 0
    text = capsys.readouterr().out
    assert "method:       prilora" in text and str(trained["model"]) in text
    assert "bert.encoder.layer.1.attention.self.value" in text and "rank 6/6" in text and "sparsity" in text
    assert "exportable:   yes" in text

    assert cli.main(["inspect", str(trained["rlora"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "rlora" and info["exportable"] is True and info["base_model"] == str(trained["model"])
    assert set(info["modules"]) == {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1)
                                    for m in ("query", "value")}
    assert all(f["r"] == 4 and f["intrinsic_dim"] >= 1 for f in info["modules"].values())
    assert info["num_parameters"] == sum(f["parameters"] for f in info["modules"].values()) + 66

    assert cli.main(["inspect", str(trained["heterolora"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(f["rank"] for f in info["modules"].values()) == [0, 0, 4, 4]

    assert cli.main(["inspect", str(trained["lora"])]) == 0
    assert "exportable:   no" in capsys.readouterr().out


def test_push_to_hub_offline_fails_cleanly_and_keeps_the_adapter(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "push"
    rc = cli.main(["train", "--method", "rlora", "--model", str(trained["model"]), "--train-file", str(trained["train"]),
                   "--max-steps", "1", "--batch-size", "8", "--no-progress", "--output-dir", str(out),
                   "--push-to-hub", "someone/tiny-rlora"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert "push-to-hub (--push-to-hub someone/tiny-rlora): upload failed" in line
    assert "cannot be reached" in line and f"saved locally in {out / 'rlora'}" in line
    assert (out / "rlora" / "adapter_model.safetensors").is_file() and (out / "results.json").is_file()
