"""PRILoRA on GLUE with RoBERTa-base: ranks rising linearly with depth (4 → 12) and A pruned during training.

Ranks 4 in the first block to 12 in the last on query/value; every ~1/15 of the steps each row of A keeps
its most important entries (|A_ij|·√(EMA of x_j²)), up to 50% sparsity at 2/3 of training. Optimizer,
epochs, learning rate, batch and warm-up: LoRA's RoBERTa-base GLUE protocol for the task. Sources:
examples/recipes/README.md.

    python examples/recipes/prilora_glue.py --task sst2          # GPU, hub data
    python examples/recipes/prilora_glue.py --task sst2 --tiny   # same code, tiny, seconds
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_common import (LORA_ROBERTA_BASE, device, load_glue, metric_line, output_dir, parser,  # noqa: E402
                         scratch, steps_override, write_results)

from peft_lowrank_ext import PriLoraConfig, prilora_ranks, prilora_sparsity  # noqa: E402
from peft_lowrank_ext.train.loop import train_classifier  # noqa: E402
from peft_lowrank_ext.train.run import TrainingConfig  # noqa: E402

ADAPTER = {"r_first": 4, "r_last": 12, "lora_alpha": 8, "target_modules": ["query", "value"], "final_sparsity": 0.5}
PRUNE_EVERY_FRACTION, PRUNE_END_FRACTION = 1 / 15, 2 / 3
TRAINING = {"batch_size": 16, "warmup_ratio": 0.06, "weight_decay": 0.0}


def main(argv=None) -> dict:
    args = parser(__doc__.split("\n\n")[0], default_task="sst2").parse_args(argv)
    out = output_dir(args, "prilora")
    epochs, lr = LORA_ROBERTA_BASE[args.task]
    with scratch() as tmp:
        data, model = load_glue(args, Path(tmp))
        tcfg = TrainingConfig(epochs=epochs, lr=lr, max_length=args.max_length, seed=args.seed, device=device(args),
                              **TRAINING, **steps_override(args))
        steps = tcfg.total_steps(len(data.train))
        schedule = {"prune_every": max(1, math.ceil(steps * PRUNE_EVERY_FRACTION)), "prune_start": 0,
                    "prune_end": max(1, round(steps * PRUNE_END_FRACTION))}
        config = PriLoraConfig(task_type="SEQ_CLS", **ADAPTER, **schedule)
        result = train_classifier(config, data, tcfg, model=model, output_dir=out / "adapter", method="prilora")
    ranks, sparsity = prilora_ranks(result.peft_model), prilora_sparsity(result.peft_model)
    del result.peft_model
    protocol = {"adapter": {**ADAPTER, **schedule}, "training": {"epochs": epochs, "lr": lr, **TRAINING},
                "max_length": args.max_length, "total_steps": steps}
    path = write_results(out, "prilora", args, protocol, {"prilora": result, "ranks": ranks, "sparsity": sparsity})
    print(f"prilora {args.task}: ranks {min(ranks.values())}..{max(ranks.values())}, mean sparsity of A "
          f"{sum(sparsity.values()) / len(sparsity):.3f}; {metric_line(result)}; wrote {path}")
    return {"path": path, "result": result, "ranks": ranks, "sparsity": sparsity}


if __name__ == "__main__":
    main()
