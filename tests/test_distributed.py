"""Data-parallel training of every method: 2 CPU processes (gloo) under torchrun and accelerate.

One ``torchrun --nproc_per_node 2`` launch trains every case under ``DistributedDataParallel``
and then under FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel``,
``use_orig_params=True``); one ``accelerate launch`` trains AutoLoRA with HF ``Trainer``. Each replica writes its full adapter state (factors, masks, gates, β and its Adam
moments, statistics, allocation state and history). The tests require

* bit-identical replicas (``broadcast_buffers=False``: no buffer is copied from rank 0, so equal
  masks/gates/β/allocations can only come from every replica deciding the same by itself);
* the same result as one process trained on the concatenated global batches: discrete decisions
  (masks, switches, counters, allocation history) exactly, floating-point tensors within the
  tolerance of a different summation order (see ``_assert_matches``);
* a clear error where FSDP2 / FSDP1 cannot run a method configuration (instead of a crash deep
  inside torch or a silently wrong result).

The worker scripts live in ``tests/distributed/`` (not collected: no ``test_`` prefix).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKERS = Path(__file__).parent / "distributed"
sys.path.insert(0, str(WORKERS))

from dp_cases import ALL_CASES, CASES, FSDP_CASES, FSDP_REFUSED, adapter_state, train  # noqa: E402
from test_prilora import _assert_same_state  # noqa: E402  (exact, key by key)

# Tensors holding decisions or counters: required to be exactly equal to the single-process run.
DISCRETE_KINDS = ("rank_mask", "element_mask", "module_on", "state", "hist_step", "hist_flags", "step", "beta_step")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(command: list[str], out_dir: Path, **extra_env: str) -> None:
    env = {**os.environ, **extra_env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true",
           "ACCELERATE_DISABLE_RICH": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(out_dir / "hf_home")}
    proc = subprocess.run([sys.executable, "-m", *command], cwd=WORKERS.parent.parent, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


@pytest.fixture(scope="module")
def torchrun_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    _launch(["torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
             str(_free_port()), str(WORKERS / "torchrun_worker.py"), str(out)], out)
    return out


@pytest.fixture(scope="module")
def single_process():
    """Single-process reference states (computed once per case): the whole global batch per step."""
    cache: dict[str, dict] = {}

    def get(name: str, steps: int | None = None) -> dict[str, torch.Tensor]:
        key = f"{name}:{steps}"
        if key not in cache:
            case = ALL_CASES[name]
            kwargs = {} if steps is None else {"steps": steps}
            cache[key] = adapter_state(train(case, rank=0, world=1, **kwargs), case.prefix)
        return cache[key]

    return get


def _replicas(out_dir: Path, stem: str) -> list[dict]:
    states = [torch.load(out_dir / f"{stem}_rank{rank}.pt") for rank in range(2)]
    for state in states:
        assert "error" not in state, state.get("traceback", state.get("error"))
    return states


def _kind(name: str, prefix: str) -> str:
    return name.split(prefix, 1)[1].split(".", 1)[0]


def _assert_matches(state: dict, reference: dict, prefix: str) -> None:
    """Discrete tensors exactly; floating-point ones within rtol 1e-4 / atol 1e-6.

    Why these tolerances: DDP averages the replicas' mean-loss gradients after an all-reduce,
    one process takes one mean over the concatenated batch — the same numbers summed in another
    order, about one float32 ulp (~1e-7 relative) apart per step. Six SGD steps (and β's Adam
    steps, the PRILoRA EMA, the proxy scores) stay within a few 1e-7 absolute here (measured: at
    most 2e-7 on weights and β, 2e-5 on SynFlow scores of size ~1e2), so rtol 1e-4 / atol 1e-6
    leave a margin of 100× while a replica that decides on its own data alone is off by 1e-2..1
    (β un-synchronised: 0.6; HeteroLoRA re-scoring on local batches: 0.15 in proxy scores).
    """
    assert state.keys() == reference.keys()
    for name, ref in reference.items():
        got = state[name]
        if _kind(name, prefix) in DISCRETE_KINDS or not ref.is_floating_point():
            assert torch.equal(got, ref), (name, got, ref)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, equal_nan=True, msg=lambda m: f"{name}: {m}")


def _assert_trained(name: str, state: dict, initial: dict, prefix: str) -> None:
    """The run did what the comparison is meant to cover (so equal states are not trivially equal)."""
    moved = {_kind(k, prefix) for k in state if not torch.equal(state[k], initial[k])}
    values = lambda kind: [v for k, v in state.items() if _kind(k, prefix) == kind]  # noqa: E731
    if name.startswith("rlora"):
        assert "z" in moved
        if name == "rlora":
            assert "log_sigma" in moved  # σ_q learned (PAC-Bayes term and noise injection)
    elif name == "autolora":
        assert {"A", "B", "beta", "beta_exp_avg"} <= moved
    elif name == "prilora":
        assert all((mask == 0).any() for mask in values("element_mask"))  # pruned during the run
        assert {"A", "B", "in_sq_ema"} <= moved
    else:  # HeteroLoRA: allocations happened, half of the 10 candidates are on
        allocations = {int(s[1]) for s in values("state")}
        assert allocations == {3 if name == "heterolora_dynamic" else 1}, allocations
        assert sum(int(on) for on in values("module_on")) == 5
        assert {"A", "B"} <= moved


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_replicas_identical_and_equal_to_single_process(name, torchrun_dir, single_process):
    case = CASES[name]
    rank0, rank1 = _replicas(torchrun_dir, f"ddp_{name}")
    _assert_same_state(rank0, rank1)
    _assert_trained(name, rank0, single_process(name, steps=0), case.prefix)
    _assert_matches(rank0, single_process(name), case.prefix)


@pytest.mark.parametrize("engine,name", [(e, n) for e, cases in FSDP_CASES.items() for n in cases])
def test_fsdp_gathered_state_equal_to_single_process(engine, name, torchrun_dir, single_process):
    case = ALL_CASES[name]
    rank0, rank1 = _replicas(torchrun_dir, f"{engine}_{name}")
    _assert_same_state(rank0, rank1)
    _assert_trained(name, rank0, single_process(name, steps=0), case.prefix)
    _assert_matches(rank0, single_process(name), case.prefix)


@pytest.mark.parametrize("engine,name", [(e, n) for e, refused in FSDP_REFUSED.items() for n in refused])
def test_fsdp_refuses_unsupported_methods_clearly(engine, name, torchrun_dir):
    for rank in range(2):
        result = torch.load(torchrun_dir / f"{engine}_{name}_rank{rank}.pt")
        assert "error" in result, f"{name} trained under {engine}; move it to FSDP_CASES and compare it"
        assert FSDP_REFUSED[engine][name] in result["error"], result["traceback"]


def test_accelerate_trainer_replicas_identical(tmp_path):
    """``accelerate launch`` (2 CPU processes) + HF ``Trainer``: AutoLoRA with a different held-out
    shard per replica ends with bit-identical replicas, β included.

    ``--multi_gpu`` is what makes accelerate start 2 processes through torchrun; on a machine
    without CUDA accelerate then runs them as MULTI_CPU with gloo (asserted in the worker).
    ``--cpu --num_processes 2`` would start a single process unless mpirun is given.
    """
    _launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
             "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
             "--dynamo_backend", "no", str(WORKERS / "accelerate_worker.py"), str(tmp_path)], tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"accelerate_rank{rank}.pt") for rank in range(2))
    _assert_same_state(rank0, rank1)
    initial = adapter_state(train(CASES["autolora"], rank=0, world=1, steps=0), CASES["autolora"].prefix)
    _assert_trained("autolora", rank0, initial, CASES["autolora"].prefix)
