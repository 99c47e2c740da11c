"""Property-based CLI checks (hypothesis): bad input is one line on stderr and exit status 2, never a traceback.

Strategies draw bad files (random bytes, truncated or wrong-type JSON, Latin-1 text, empty files,
folders where files are expected) for ``--train-file``, ``--config`` and the adapter folder of
``export``/``inspect``, and bad flags (negative, huge or non-numeric numbers, unknown choices,
missing values). Every example runs ``main(argv)`` in-process and asserts: exit status 2, exactly one
non-empty line on stderr (no usage block), no ``Traceback``, and nothing written to the output folder.
No example may train or load a base model: both are replaced by a tripwire for the whole module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_lowrank_ext.cli import adapters as cli_adapters
from peft_lowrank_ext.cli import main as cli
from peft_lowrank_ext.cli import recipes
from test_training import easy_rows, save_tiny_bert, write_csv

EXAMPLES = int(os.environ.get("CLI_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("CLI_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Tripwire(Exception):
    """Raised if an example gets as far as training or loading a base model (main reports it as unexpected, exit 1)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-fuzz")
    trained = d / "adapter"  # a well-formed adapter config next to which the weights are spoiled
    trained.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        def tripwire(*args, **kwargs):
            raise Tripwire("bad input reached training / model loading")

        mp.setattr(recipes, "run_method", tripwire)
        mp.setattr(cli_adapters, "load_adapter_model", tripwire)
        yield {"dir": d, "model": save_tiny_bert(d / "model"), "train": write_csv(d / "train.csv", easy_rows(12))}


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``main(argv)``'s exit status and stderr (stdout is dropped)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def assert_one_line_error(code, err: str, out: Path, argv) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, code, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err and "usage:" not in err, (argv, err)
    assert lines[0].startswith("peft-lowrank-ext") and "error: " in lines[0], (argv, err)
    assert not out.exists() or not any(out.iterdir()), (argv, sorted(out.rglob("*")))


# ----- bad files ------------------------------------------------------------------------------------------
WORDS = st.text(alphabet="abcdéèçñüöß ", min_size=1, max_size=12)
WRONG_TYPE_JSON = st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.floats(allow_nan=False),
                            st.text(max_size=8), st.none(), st.booleans(),
                            st.dictionaries(st.sampled_from(["peft_type", "r", "x"]),
                                            st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2)),
                                            max_size=3))


@st.composite
def bad_file(draw, kind_of_file: str):
    """(kind, bytes or None for a folder) of a file that cannot be what ``kind_of_file`` needs."""
    kind = draw(st.sampled_from(["random", "truncated_json", "wrong_type_json", "latin1", "empty", "folder"]))
    if kind == "random":
        data = draw(st.binary(min_size=1, max_size=48))
    elif kind == "truncated_json":
        text = json.dumps({"peft_type": "RLORA", "r": 4, "text": "ok", "label": 1, "methods": ["lora"]})
        data = text[: draw(st.integers(1, len(text) - 1))].encode()
    elif kind == "wrong_type_json":
        value = draw(WRONG_TYPE_JSON)
        if kind_of_file == "adapter_config" and isinstance(value, dict) and isinstance(value.get("peft_type"), str):
            value["peft_type"] = 1  # a string peft_type could be a valid config
        data = json.dumps(value).encode()
    elif kind == "latin1":
        header = "text,label\n" if kind_of_file == "train" else '{"a": "'
        tail = ",1\n" if kind_of_file == "train" else '"}'
        data = (header + draw(WORDS) + "é" + draw(WORDS) + tail).encode("latin-1")
    elif kind == "empty":
        data = b""
    else:
        data = None
    return kind, data


def place(path: Path, data: bytes | None) -> Path:
    if data is None:
        path.mkdir(parents=True)
    else:
        path.write_bytes(data)
    return path


@FUZZ
@given(case=bad_file("train"), suffix=st.sampled_from([".csv", ".tsv", ".json", ".jsonl"]),
       command=st.sampled_from(["train", "compare"]))
def test_bad_training_file(world, case, suffix, command):
    kind, data = case
    with tempfile.TemporaryDirectory(dir=world["dir"]) as tmp:
        train = place(Path(tmp) / f"train{suffix}", data)
        out = Path(tmp) / "out"
        argv = [command, *(["--method", "lora"] if command == "train" else ["--methods", "lora"]),
                "--model", str(world["model"]), "--train-file", str(train), "--no-progress", "--output-dir", str(out)]
        code, err = run_cli(argv)
        assert_one_line_error(code, err, out, argv)
        if kind == "latin1":
            assert "not UTF-8" in err and "re-save it as UTF-8" in err, err


@FUZZ
@given(case=bad_file("config"), suffix=st.sampled_from([".json", ".yaml"]))
def test_bad_config_file(world, case, suffix):
    kind, data = case
    if kind == "empty" and suffix == ".yaml":
        suffix = ".json"  # an empty YAML file is a valid, empty config
    if kind in ("random", "truncated_json") and suffix == ".yaml":
        data = b"{[\xff" + data  # YAML reads most junk as a plain string; keep it junk
    if kind == "wrong_type_json" and suffix == ".yaml" and data in (b"null", b"{}"):
        data = b"[1]"
    if kind == "wrong_type_json" and data == b"{}":
        data = b"[]"  # an empty mapping is a valid, empty config
    with tempfile.TemporaryDirectory(dir=world["dir"]) as tmp:
        config = place(Path(tmp) / f"config{suffix}", data)
        out = Path(tmp) / "out"
        argv = ["train", "--method", "lora", "--model", str(world["model"]), "--train-file", str(world["train"]),
                "--config", str(config), "--no-progress", "--output-dir", str(out)]
        code, err = run_cli(argv)
        assert_one_line_error(code, err, out, argv)
        assert "--config" in err, err


@FUZZ
@given(config=bad_file("adapter_config"), spoil=st.sampled_from(["config", "weights", "folder"]),
       weights=st.sampled_from(["garbage", "missing", "folder"]), command=st.sampled_from(["export", "inspect"]),
       folder_kind=st.sampled_from(["file", "missing"]))
def test_bad_adapter_folder(world, config, spoil, weights, command, folder_kind):
    _, data = config
    valid = json.dumps({"peft_type": "RLORA", "r": 4, "target_modules": ["query"], "task_type": "SEQ_CLS",
                        "base_model_name_or_path": str(world["model"])}).encode()
    with tempfile.TemporaryDirectory(dir=world["dir"]) as tmp:
        folder = Path(tmp) / "adapter"
        if spoil == "config":  # a bad adapter_config.json next to a readable safetensors file
            folder.mkdir()
            place(folder / "adapter_config.json", data)
            shutil.copy(world["model"] / "model.safetensors", folder / "adapter_model.safetensors")
        elif spoil == "weights":  # a good config, bad or no weights
            folder.mkdir()
            place(folder / "adapter_config.json", valid)
            if weights == "garbage":
                (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 2)
            elif weights == "folder":
                (folder / "adapter_model.safetensors").mkdir()
        elif folder_kind == "file":  # ADAPTER_DIR is a file
            folder.write_bytes(data or b"x")
        out = Path(tmp) / "out"
        argv = ["export", str(folder), str(out)] if command == "export" else ["inspect", str(folder)]
        code, err = run_cli(argv)
        assert_one_line_error(code, err, out, argv)
        assert "ADAPTER_DIR" in err, err


# ----- bad flags ------------------------------------------------------------------------------------------
NOT_NUMBERS = ["abc", "", "1,5", "0x", "one", "1e", "nan", "inf", "-inf"]  # not "--": argparse drops --flag=--
BAD_FLAGS = {  # flag -> values it must refuse
    "--r": ["0", "-1", "1.5", "1000000000000000000000", "33"],  # 33 > min(in, out) = 32 of the tiny model
    "--lora-alpha": ["0", "-2", "1e400"],
    "--epochs": ["0", "-1", "1e400"],
    "--batch-size": ["0", "-8", "2.5"],
    "--max-length": ["0", "-1"],
    "--max-steps": ["0", "-3"],
    "--max-train-samples": ["0", "-1"],
    "--seed": ["-1", "4294967296", "100000000000000000000"],
    "--threads": ["0", "100000000"],
    "--lr": ["0", "-0.1", "1e400"],
    "--rlora-lr": ["0", "-1"],
    "--projection-ratio": ["0", "1.5", "-0.1", "1e30"],
    "--intrinsic-dim": ["0", "-4"],
    "--pac-bayes-weight": ["-0.1", "1e400"],
    "--prilora-final-sparsity": ["1", "-0.5", "1e30"],
    "--heterolora-budget": ["0", "2", "1e30"],
    "--autolora-arch-lr": ["0", "-1"],
    "--task": ["seq2seq", "CLASSIFICATION", ""],
    "--heterolora-mode": ["often", ""],
    "--heterolora-proxy": ["magic"],
    "--autolora-hypergradient": ["third"],
    "--method": ["dora", "LoRA", ""],
}


@FUZZ
@given(flag=st.sampled_from(sorted(BAD_FLAGS)), data=st.data(), missing_value=st.booleans(),
       numeric_junk=st.sampled_from(NOT_NUMBERS))
def test_bad_flag_values(world, flag, data, missing_value, numeric_junk):
    value = data.draw(st.sampled_from(BAD_FLAGS[flag]))
    if flag not in ("--task", "--heterolora-mode", "--heterolora-proxy", "--autolora-hypergradient", "--method") \
            and data.draw(st.booleans()):
        value = numeric_junk
    with tempfile.TemporaryDirectory(dir=world["dir"]) as tmp:
        out = Path(tmp) / "out"
        base = ["train", "--model", str(world["model"]), "--train-file", str(world["train"]), "--no-progress",
                "--output-dir", str(out)]
        method = [] if flag == "--method" else ["--method", "lora"]
        # a missing value: the flag last on the line
        argv = [*base, *method, flag] if missing_value else [*base, *method, f"{flag}={value}"]
        code, err = run_cli(argv)
        assert_one_line_error(code, err, out, argv)
        assert flag in err or "argument" in err, err
        if not missing_value and flag not in ("--r",):  # argparse's own checks end with the hint
            assert err.rstrip().endswith("run with --help for the options"), err


@FUZZ
@given(argv=st.lists(st.sampled_from(["--bogus", "-x", "--r", "--methods", "nope", "export", "inspect", "--json",
                                      "--output-dir", "--model", "--layout", "--head"]), min_size=1, max_size=4))
def test_unknown_or_incomplete_arguments(world, argv):
    argv = ["--bogus", *argv] if argv[0] not in ("export", "inspect") else [*argv, "--bogus"]
    with tempfile.TemporaryDirectory(dir=world["dir"]) as tmp:
        out = Path(tmp) / "out"
        code, err = run_cli([*argv, "--output-dir", str(out)] if "export" not in argv else argv)
        assert_one_line_error(code, err, out, argv)
        assert err.rstrip().endswith("run with --help for the options"), err


# ----- the cases of the issue, one by one ------------------------------------------------------------------
def _adapter(world, tmp: Path, config: bytes, weights: bytes | None = None) -> Path:
    folder = tmp / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(config)
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_issue_cases_are_one_clear_line(world, tmp_path):
    valid = json.dumps({"peft_type": "RLORA", "r": 4, "target_modules": ["query"],
                        "base_model_name_or_path": str(world["model"])})
    cases = [  # (argv, what the line must say)
        (["export", str(_adapter(world, tmp_path / "a", b"[]")), str(tmp_path / "out")],
         ["argument ADAPTER_DIR", "adapter_config.json holds a list, not a JSON object"]),
        (["export", str(_adapter(world, tmp_path / "b", valid.encode(), b"garbage")), str(tmp_path / "out")],
         ["argument ADAPTER_DIR", "adapter_model.safetensors", "is not a readable safetensors file"]),
        (["export", str(_adapter(world, tmp_path / "c", valid[:28].encode())), str(tmp_path / "out")],
         ["argument ADAPTER_DIR", "adapter_config.json is not valid JSON: Expecting value: line 1 column 29"]),
        (["train", "--method", "lora", "--model", str(world["model"]), "--output-dir", str(tmp_path / "out"),
          "--train-file", str(place(tmp_path / "latin.csv", "text,label\ncafé,1\n".encode("latin-1")))],
         ["train_file (--train-file)", "is not UTF-8 text (byte 0xe9 at byte 14", "re-save it as UTF-8"]),
        (["train", "--method", "lora", "--model", str(world["model"]), "--train-file", str(world["train"]),
          "--target-modules", "nonexistent", "query", "--output-dir", str(tmp_path / "out")],
         ["--target-modules", "'nonexistent' matches no module", "its Linear modules: query, key, value, dense"]),
        (["train", "--method", "lora", "--r", "0"], ["argument --r: must be a positive integer, got '0'",
                                                    "; run with --help for the options"]),
    ]
    for argv, needles in cases:
        code, err = run_cli(argv)
        assert_one_line_error(code, err, tmp_path / "out", argv)
        for needle in needles:
            assert needle in err, (needle, err)


def test_unreachable_hub_switches_to_offline_at_once(monkeypatch):
    """No Hub: one short connection attempt, then offline mode (no retries), so a hub id fails in seconds."""
    import time

    from peft_lowrank_ext.train import hub

    for name in hub.OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "_probed", None)
    assert not hub.fail_fast_offline(str(Path(__file__).parent))  # a local path: no probe, no offline mode
    t0 = time.perf_counter()
    assert hub.fail_fast_offline("some/unknown-model")
    assert time.perf_counter() - t0 < hub.PROBE_TIMEOUT_S + 1
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.offline_requested()
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE
