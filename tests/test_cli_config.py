"""`--config FILE.yaml|.json`: options from a file, command-line flags win, bad keys and values are named."""

from __future__ import annotations

import json

import pytest

from peft_lowrank_ext.cli import main as cli
from test_training import easy_rows, save_tiny_bert, write_csv


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-config")
    return {"model": save_tiny_bert(d / "model"), "train": write_csv(d / "train.csv", easy_rows(24, seed=1))}


def test_yaml_config_with_command_line_override(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"""\
# keys are option names, with dashes or underscores
method: rlora
model: {tiny['model']}
train_file: {tiny['train']}
max-steps: 2
batch_size: 8
r: 4
lora_alpha: 4
target_modules: [query]
intrinsic_dim: 3
pac_bayes_weight: 0
rlora_lr: 0.05
no_progress: true
output_dir: {out}
""")
    assert cli.main(["train", "--config", str(cfg), "--r", "2"]) == 0  # the flag beats the file's r: 4
    data = json.loads((out / "results.json").read_text())
    s = data["settings"]
    assert (s["r"], s["lora_alpha"], s["max_steps"], s["batch_size"], s["target_modules"]) == (2, 4.0, 2, 8, ["query"])
    saved = json.loads((out / "rlora" / "adapter_config.json").read_text())
    assert saved["r"] == 2 and saved["intrinsic_dim"] == 3 and saved["target_modules"] == ["query"]
    assert data["results"][0]["lr"] == 0.05 and data["results"][0]["trainable_params"] == 2 * 3 + 66


def test_json_config_for_compare_and_inspect(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    cfg = tmp_path / "cmp.json"
    cfg.write_text(json.dumps({"methods": ["lora", "prilora"], "model": str(tiny["model"]),
                               "train-file": str(tiny["train"]), "max_steps": 1, "r": 2, "no-progress": True,
                               "output-dir": str(out), "prilora_final_sparsity": 0.25}))
    assert cli.main(["--config", str(cfg)]) == 0  # no subcommand: compare
    data = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in data["results"]] == ["lora", "prilora"]
    assert json.loads((out / "prilora" / "adapter_config.json").read_text())["final_sparsity"] == 0.25
    capsys.readouterr()
    inspect_cfg = tmp_path / "inspect.yaml"
    inspect_cfg.write_text("json: true\n")
    assert cli.main(["inspect", str(out / "prilora"), "--config", str(inspect_cfg)]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "prilora"


@pytest.mark.parametrize(
    "content, needle",
    [
        ("methods: [lora]\nlearning_rate: 0.1\n", "unknown key 'learning_rate'; allowed keys: "),
        ("r: 0\n", "key 'r' (--r): must be a positive integer, got '0'"),
        ("methods: [lora, dora]\n", "key 'methods' (--methods): invalid choice: 'dora' (choose from lora, rlora, "
                                    "autolora, prilora, heterolora)"),
        ("task: seq2seq\n", "key 'task' (--task): invalid choice: 'seq2seq' (choose from auto, classification, regression, causal-lm)"),
        ("no_progress: maybe\n", "key 'no_progress' (--no-progress): must be true or false"),
        ("epochs: -1\n", "key 'epochs' (--epochs): must be a number > 0"),
        ("r: [1, 2]\n", "key 'r': must be a single value"),
        ("- r\n- 4\n", "must hold a mapping of option names to values"),
        ("r: [unclosed\n", "argument --config: cannot parse"),
    ],
)
def test_bad_config_files_name_the_key_and_the_allowed_values(tmp_path, capsys, content, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    with pytest.raises(SystemExit) as exc:
        cli.main(["compare", "--config", str(cfg)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    if "unknown key" in needle:  # the list names real options
        for key in ("batch-size", "methods", "model", "r", "train-file", "heterolora-mode"):
            assert key in err


def test_config_file_type_and_existence(tmp_path, capsys):
    for name, needle in (("c.toml", "unsupported file type '.toml'"), ("missing.yaml", "file not found")):
        if name.endswith(".toml"):
            (tmp_path / name).write_text("r = 4\n")
        with pytest.raises(SystemExit) as exc:
            cli.main(["train", "--method", "lora", "--config", str(tmp_path / name)])
        assert exc.value.code == 2 and "argument --config" in (err := capsys.readouterr().err) and needle in err
