"""One replica of the DeepSpeed ZeRO runs, launched by ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node 2 deepspeed_worker.py OUT_DIR [STAGE:CASE ...]`` trains
each ``CASE`` through ``deepspeed.initialize`` with ZeRO ``STAGE`` (DeepSpeed's CPU accelerator) in one
process group and writes ``OUT_DIR/zero{stage}_{case}_rank{r}.pt``: the replica's full adapter state
(gathered under ZeRO-3) or ``{"error": message}`` where the method refuses the engine.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dp_cases import ALL_CASES, DEEPSPEED_RUNS, gathered_adapter_state, train_deepspeed  # noqa: E402


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    out_dir, *runs = sys.argv[1:]
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for run in runs or DEEPSPEED_RUNS:
        stage, name = run.split(":")
        case = ALL_CASES[name.split("@")[0]]
        try:
            model = train_deepspeed(case, rank, world, int(stage), accumulation=2 if name.endswith("@gas2") else 1)
            result = gathered_adapter_state(model, case.prefix)
        except Exception as err:  # recorded for the test, which decides whether a refusal is expected
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        torch.save(result, os.path.join(out_dir, f"zero{stage}_{name}_rank{rank}.pt"))
        dist.barrier()


if __name__ == "__main__":
    main()
