"""DeepSpeed ZeRO-2 and ZeRO-3 for every method: 2 CPU processes (DeepSpeed's CPU accelerator, gloo).

ZeRO's inner optimizer steps flat fp32 partitions, so the package runs each method's per-step work at
``DeepSpeedEngine.step`` instead (``runtime/deepspeed_steps.py``). Two launches:

* ``deepspeed.initialize`` with the DDP tests' loop (SGD with momentum, no clipping): every replica
  identical and equal to one process trained on the concatenated batches, within the DDP tests'
  tolerances (``test_distributed._assert_matches``), decisions exactly;
* HF ``Trainer`` with ``TrainingArguments(deepspeed=...)`` and its defaults (AdamW, clipping 1.0, as
  ``"auto"`` values), and TRL ``SFTTrainer(peft_config=...)`` with ``SFTConfig(deepspeed=...)``: identical
  replicas that trained and ran the method (pruned, allocated, β or σ_q moved).

Where a stage refuses a method, the error must say so (``DEEPSPEED_REFUSED``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from test_distributed import (  # noqa: E402,F401 (single_process: the fixture, one process per case)
    WORKERS, _assert_matches, _assert_trained, _free_port, _launch, _replicas, single_process,
)
from dp_cases import (  # noqa: E402
    ALL_CASES, DEEPSPEED_REFUSED, DEEPSPEED_RUNS, DEEPSPEED_TRAINER_RUNS,
)
from test_prilora import _assert_same_state  # noqa: E402


def _torchrun(worker: str, out: Path, **env) -> None:
    _launch(["torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
             str(_free_port()), str(WORKERS / worker), str(out)], out, **env)


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed")
    _torchrun("deepspeed_worker.py", out)
    return out


@pytest.fixture(scope="module")
def trainer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deepspeed_trainer")
    _torchrun("deepspeed_trainer_worker.py", out)
    return out


def _split(run: str) -> tuple[int, str]:
    stage, name = run.split(":")
    return int(stage), name


def _refused(out_dir: Path, stem: str, stage: int, name: str) -> bool:
    """Whether ZeRO-``stage`` refuses ``name``; if so, both replicas must have raised the expected error."""
    if name not in DEEPSPEED_REFUSED.get(stage, {}):
        return False
    for rank in range(2):
        result = torch.load(out_dir / f"{stem}_rank{rank}.pt")
        assert "error" in result, f"{name} trained under ZeRO-{stage}; remove it from DEEPSPEED_REFUSED and compare it"
        assert DEEPSPEED_REFUSED[stage][name] in result["error"], result["traceback"]
    return True


@pytest.mark.parametrize("run", DEEPSPEED_RUNS)
def test_zero_engine_replicas_equal_single_process(run, engine_dir, single_process):
    stage, name = _split(run)
    if _refused(engine_dir, f"zero{stage}_{name}", stage, name):
        return
    base = name.split("@")[0]  # "@gas2": 2 micro-batches per step, against the same single-process run
    case = ALL_CASES[base]
    rank0, rank1 = _replicas(engine_dir, f"zero{stage}_{name}")
    _assert_same_state(rank0, rank1)
    _assert_trained(base, rank0, single_process(base, steps=0), case.prefix)
    _assert_matches(rank0, single_process(base), case.prefix)


@pytest.mark.parametrize("run", DEEPSPEED_TRAINER_RUNS)
def test_zero_trainer_defaults_replicas_identical_and_method_ran(run, trainer_dir, single_process):
    stage, name = _split(run)
    if _refused(trainer_dir, f"trainer_zero{stage}_{name}", stage, name):
        return
    case = ALL_CASES[name.removeprefix("sft_")]
    rank0, rank1 = _replicas(trainer_dir, f"trainer_zero{stage}_{name}")
    _assert_same_state(rank0, rank1)
    if name.startswith("sft_"):  # SFTTrainer(peft_config=...): its own init, so check what only the method does
        if name == "sft_prilora":
            masks = [v for k, v in rank0.items() if ".prilr_element_mask." in k]
            assert masks and all((m == 0).any() for m in masks)  # pruned
        else:  # the learned σ_q only moves through the PAC-Bayes gradient and the noise
            init = math.log(case.make_config().posterior_sigma)
            sigmas = [v for k, v in rank0.items() if ".rlr_log_sigma." in k]
            assert sigmas and all(abs(float(s) - init) > 1e-6 for s in sigmas)
    elif name.startswith("heterolora"):  # 4 Trainer steps, re-allocation every 2: allocated at steps 0 and 2
        states = [v for k, v in rank0.items() if ".hetlr_state." in k]
        assert {int(s[1]) for s in states} == {2}, states
        assert sum(int(v) for k, v in rank0.items() if ".hetlr_module_on." in k) == 5
        moved = [k for k, v in rank0.items() if ".hetlr_A." in k and not torch.equal(v, single_process(name, 0)[k])]
        assert moved
    else:
        _assert_trained(name, rank0, single_process(name, steps=0), case.prefix)
