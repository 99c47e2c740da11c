"""One replica of the data-parallel runs, launched by ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 torchrun_worker.py OUT_DIR [ENGINE:CASE ...]``
trains each ``CASE`` under ``ENGINE`` (``ddp``, ``fsdp2`` or ``fsdp1``; default: every DDP case, then
every FSDP2 and FSDP1 case, supported and refused) in sequence in one process group — one launch, one start-up —
and writes ``OUT_DIR/{engine}_{case}_rank{r}.pt``: either the replica's full adapter state or,
when the engine refuses the method, ``{"error": message}``. The test compares the files.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dp_cases import ALL_CASES, CASES, FSDP_CASES, FSDP_REFUSED, adapter_state, train  # noqa: E402
from fsdp_wraps import fsdp1_wrap, fsdp2_wrap  # noqa: E402


def ddp_wrap(model):
    # broadcast_buffers=False: no buffer is copied from rank 0, so equal masks/gates/β on every replica
    # can only come from every replica taking the same decision itself.
    return torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)


WRAPPERS = {"ddp": ddp_wrap, "fsdp2": fsdp2_wrap, "fsdp1": fsdp1_wrap}
DEFAULT_RUNS = [f"ddp:{name}" for name in CASES] + [f"{engine}:{name}" for engine in ("fsdp2", "fsdp1")
                                                     for name in [*FSDP_CASES[engine], *FSDP_REFUSED[engine]]]


def main() -> None:
    out_dir, *runs = sys.argv[1:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for run in runs or DEFAULT_RUNS:
            engine, name = run.split(":")
            case = ALL_CASES[name]
            try:
                model = train(case, rank, world, WRAPPERS[engine])
                result = adapter_state(model, case.prefix)
            except Exception as err:  # recorded for the test, which decides whether a refusal is expected
                result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{engine}_{name}_rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
