"""Faults: a run SIGKILLed after a checkpoint resumes bit-identically, and damaged files give clear errors.

Kill/resume runs out of process (``faults/kill_resume_worker.py``, one interpreter, one forked training
process per method, PEFT LoRA as control); ``test_trl_resume.py`` is the in-process SFTTrainer version.
Damaged adapter folders and checkpoints must raise an error naming the file — never load a partly
re-initialised adapter or silently restart the optimizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from faults.kill_resume_worker import MAX_STEPS, METHOD_NAMES, SAVE_STEPS, make_trainer, method_configs
from models import TINY_MODELS
from peft_lowrank_ext import CorruptFileError, verify_adapter_folder, verify_checkpoint

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "faults" / "kill_resume_worker.py"
CASE = TINY_MODELS["llama"]
OUR_METHODS = tuple(m for m in METHOD_NAMES if m != "lora")

# Adapter tensors whose values must move after the kill point (so the resumed run had real work to redo).
MOVES_AFTER_KILL = {
    "lora": ("lora_A", "lora_B"),
    "rlora": ("rlr_z", "rlr_log_sigma"),
    "autolora": ("autolr_beta", "autolr_beta_exp_avg", "autolr_beta_exp_avg_sq", "autolr_beta_step"),
    "prilora": ("prilr_element_mask", "prilr_in_sq_ema", "prilr_step"),
    "heterolora": ("hetlr_hist_step", "hetlr_hist_proxy", "hetlr_state"),
}
# Per method, the tensors a hand-written weights file leaves out in the missing-keys test.
LEFT_OUT = {
    "rlora": "rlr_z",
    "autolora": "autolr_beta",
    "prilora": "prilr_element_mask",
    "heterolora": "hetlr_module_on",
}


# --- SIGKILL after a checkpoint, then resume -------------------------------------------------------------

@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Runs the worker, SIGKILLs each method's training process once it signals, returns the output folder."""
    out = tmp_path_factory.mktemp("kill_resume")
    log_path = out / "worker.log"
    pending = set(METHOD_NAMES)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(out)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            while pending and proc.poll() is None:
                for method in sorted(pending):
                    ready = out / method / "ready"
                    if ready.exists():
                        os.kill(int(ready.read_text()), signal.SIGKILL)
                        pending.discard(method)
                time.sleep(0.05)
            proc.wait(timeout=500)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not pending and proc.returncode == 0, log_path.read_text()[-6000:]
    return out


def _bit_identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` would call two NaN sentinels different)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8))


def _without_adapter_name(key: str) -> str:
    return key.replace(".default", "")


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_sigkill_after_checkpoint_then_resume_is_bit_identical(method, killed_and_resumed):
    folder = killed_and_resumed / method
    # The training process died by SIGKILL, mid-step, after checkpoint-SAVE_STEPS and before the next one.
    assert (folder / "ended_by").read_text() == f"signal {int(signal.SIGKILL)}"
    assert (folder / "checkpoints_at_kill").read_text().split() == [f"checkpoint-{SAVE_STEPS}"]
    # The resumed run continued from the checkpoint instead of starting over.
    assert int((folder / "resumed_steps").read_text()) == MAX_STEPS - SAVE_STEPS

    reference = torch.load(folder / "reference.pt")
    resumed = torch.load(folder / "resumed.pt")
    assert reference and resumed.keys() == reference.keys()
    different = [name for name in reference if not _bit_identical(resumed[name], reference[name])]
    assert not different, f"resumed {method} differs from the uninterrupted run in {different}"

    # The checkpoint holds every adapter tensor, and the state named in MOVES_AFTER_KILL moved after it.
    at_checkpoint = load_file(folder / "killed" / f"checkpoint-{SAVE_STEPS}" / "adapter_model.safetensors")
    assert set(at_checkpoint) == {_without_adapter_name(n) for n in reference}
    for part in MOVES_AFTER_KILL[method]:
        names = [n for n in reference if _without_adapter_name(n).split(".")[-1 if method != "lora" else -2] == part]
        assert names, part
        assert any(not _bit_identical(reference[n], at_checkpoint[_without_adapter_name(n)]) for n in names), part


# --- damaged adapter folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory):
    """One ``save_pretrained`` folder per method."""
    root = tmp_path_factory.mktemp("adapters")
    for method in OUR_METHODS:
        config = method_configs()[method][0]
        get_peft_model(CASE.build(), config).save_pretrained(root / method)
    return root


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(range(0xF0, 0x100))  # invalid UTF-8 in the middle of the JSON
    path.write_bytes(bytes(data))


FOLDER_FAULTS = {
    "weights_deleted": ("adapter_model.safetensors", lambda p: p.unlink()),
    "weights_truncated": ("adapter_model.safetensors", _truncate),
    "weights_emptied": ("adapter_model.safetensors", lambda p: p.write_bytes(b"")),
    "config_deleted": ("adapter_config.json", lambda p: p.unlink()),
    "config_truncated": ("adapter_config.json", _truncate),
    "config_garbled": ("adapter_config.json", _garble),
    "config_not_an_object": ("adapter_config.json", lambda p: p.write_text("[1, 2]")),
}


def _damaged_copy(source: Path, target: Path, fault: str) -> Path:
    shutil.copytree(source, target)
    file_name, damage = FOLDER_FAULTS[fault]
    damage(target / file_name)
    return target


@pytest.mark.parametrize("fault", sorted(FOLDER_FAULTS))
@pytest.mark.parametrize("method", OUR_METHODS)
def test_damaged_adapter_folder_names_the_file(method, fault, saved_adapters, tmp_path):
    folder = _damaged_copy(saved_adapters / method, tmp_path / "adapter", fault)
    file_name = FOLDER_FAULTS[fault][0]
    with pytest.raises(ValueError, match=file_name.replace(".", r"\.")):
        PeftModel.from_pretrained(CASE.build(), folder)
    with pytest.raises(CorruptFileError, match=file_name.replace(".", r"\.")):
        verify_adapter_folder(folder)
    # transformers' own loader: the same errors, except where transformers reports first (its message names
    # the file when the weights are missing, only the folder when the config is).
    error_type, named = {"weights_deleted": (FileNotFoundError, str(folder / file_name)),
                         "config_deleted": (ValueError, f"not found in {folder}")}.get(
        fault, (CorruptFileError, str(folder / file_name)))
    with pytest.raises(error_type, match=re.escape(named)):
        CASE.build().load_adapter(str(folder))


@pytest.mark.parametrize("method", OUR_METHODS)
def test_intact_adapter_folder_passes_and_loads(method, saved_adapters):
    verify_adapter_folder(saved_adapters / method)
    model = PeftModel.from_pretrained(CASE.build(), saved_adapters / method)
    saved = load_file(saved_adapters / method / "adapter_model.safetensors")
    loaded = {_without_adapter_name(n): t for n, t in model.state_dict().items() if method_configs()[method][1] in n}
    assert loaded.keys() == saved.keys() and all(_bit_identical(loaded[n], saved[n]) for n in saved)


@pytest.mark.parametrize("method", OUR_METHODS)
def test_weights_file_missing_method_tensors_is_refused(method, saved_adapters, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(saved_adapters / method, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    left_out = sorted(k for k in weights if k.split(".")[-1] == LEFT_OUT[method])
    assert left_out
    save_file({k: v for k, v in weights.items() if k not in left_out}, folder / "adapter_model.safetensors")

    # PEFT alone would only warn (from_pretrained) or say nothing (load_adapter, Trainer resume).
    with pytest.raises(CorruptFileError, match="adapter_model.safetensors") as error:
        PeftModel.from_pretrained(CASE.build(), folder)
    assert f"lacks {len(left_out)} tensor(s)" in str(error.value) and left_out[0] in str(error.value)
    assert error.value.path == str(folder / "adapter_model.safetensors")
    second = get_peft_model(CASE.build(), method_configs()[method][0])
    with pytest.raises(CorruptFileError, match=LEFT_OUT[method]):
        second.load_adapter(str(folder), adapter_name="other")


# --- damaged Trainer checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoint-1 of a one-step HF Trainer run per method."""
    root = tmp_path_factory.mktemp("checkpoints")
    for method in OUR_METHODS:
        make_trainer(method, str(root / method), max_steps=1, save_steps=1).train()
    return root


CHECKPOINT_FAULTS = {
    "weights_truncated": ("adapter_model.safetensors", _truncate),
    "optimizer_truncated": ("optimizer.pt", _truncate),
    "trainer_state_truncated": ("trainer_state.json", _truncate),
    "optimizer_deleted": ("optimizer.pt", lambda p: p.unlink()),
    "scheduler_truncated": ("scheduler.pt", _truncate),
    "rng_state_truncated": ("rng_state.pth", _truncate),
    "rng_state_deleted": ("rng_state.pth", lambda p: p.unlink()),
    "trainer_state_deleted": ("trainer_state.json", lambda p: p.unlink()),
    "weights_missing_a_tensor": ("adapter_model.safetensors", None),
}
# The three required faults run for every method, the rest for one method each (same code path).
CHECKPOINT_CASES = [(m, f) for m in OUR_METHODS for f in ("weights_truncated", "optimizer_truncated",
                                                          "trainer_state_truncated")] + [
    (OUR_METHODS[i % len(OUR_METHODS)], f) for i, f in enumerate(
        ["optimizer_deleted", "scheduler_truncated", "rng_state_truncated", "rng_state_deleted",
         "trainer_state_deleted", "weights_missing_a_tensor"])]


def _drop_one_method_tensor(path: Path, method: str) -> None:
    weights = load_file(path)
    victim = sorted(k for k in weights if k.split(".")[-1] == LEFT_OUT[method])[0]
    save_file({k: v for k, v in weights.items() if k != victim}, path)


@pytest.mark.parametrize("method,fault", CHECKPOINT_CASES)
def test_damaged_checkpoint_resume_names_the_file(method, fault, checkpoints, tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoints / method / "checkpoint-1", checkpoint)
    file_name, damage = CHECKPOINT_FAULTS[fault]
    if damage is None:
        _drop_one_method_tensor(checkpoint / file_name, method)
    else:
        damage(checkpoint / file_name)
    pattern = file_name.replace(".", r"\.")
    if damage is not None:  # a file that parses but lacks tensors needs the model: the load itself checks it
        with pytest.raises(CorruptFileError, match=pattern):
            verify_checkpoint(checkpoint)
    trainer = make_trainer(method, str(tmp_path / "run"), max_steps=2, save_steps=1)
    with pytest.raises(CorruptFileError, match=pattern) as error:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert error.value.path == str(checkpoint / file_name)
    assert trainer.state.global_step == 0, "training must not start from a damaged checkpoint"


def test_intact_checkpoint_passes_verification_in_depth(checkpoints):
    for method in OUR_METHODS:
        verify_checkpoint(checkpoints / method / "checkpoint-1", deep=True)
        state = json.loads((checkpoints / method / "checkpoint-1" / "trainer_state.json").read_text())
        assert state["global_step"] == 1


def test_verify_checkpoint_detects_a_corrupted_archive_member_in_depth(checkpoints, tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoints / "prilora" / "checkpoint-1", checkpoint)
    optimizer = checkpoint / "optimizer.pt"
    with zipfile.ZipFile(optimizer) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(optimizer.read_bytes())
    # Local header: 30 bytes, then the name and the extra field, then the stored tensor bytes.
    name_len, extra_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    start = member.header_offset + 30 + name_len + extra_len + member.file_size // 2
    data[start] ^= 0xFF
    optimizer.write_bytes(bytes(data))
    verify_checkpoint(checkpoint)  # the quick check reads the archive's directory only
    with pytest.raises(CorruptFileError, match=r"optimizer\.pt.*checksum"):
        verify_checkpoint(checkpoint, deep=True)
