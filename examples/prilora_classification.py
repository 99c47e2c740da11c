"""PRILoRA: ranks that rise with depth, and A pruned during training, with Hugging Face ``Trainer``.

What it shows:

1. ``PriLoraConfig(r_first, r_last)``: block l of L gets rank ``r_first + (r_last − r_first)·l/(L−1)``;
   ``prilora_ranks`` lists them per module.
2. Pruning needs no code of yours: every ``prune_every`` optimizer steps each row of ``A`` keeps its
   most important entries up to the scheduled sparsity (ramping to ``final_sparsity`` at
   ``prune_end``). A small ``TrainerCallback`` prints ``prilora_sparsity`` as training goes.
3. The checks: ranks rise with depth from ``r_first`` to ``r_last``, and once ``prune_end`` is
   passed every module is at the final sparsity; the script exits with status 1 otherwise.

By default the pruning schedule is stretched over the run: a pruning event every 10% of the
steps, the final sparsity reached at 70% of them.

Full size (3 epochs on the packaged MiniLM)::

    python examples/prilora_classification.py

Smoke test::

    python examples/prilora_classification.py --max-steps 3 --max-train-samples 16 --max-eval-samples 16
"""

from __future__ import annotations

import argparse
import math
import re
import sys

from peft import get_peft_model
from transformers import TrainerCallback

from peft_lowrank_ext import PriLoraConfig, prilora_ranks, prilora_sparsity, prilora_step
from example_utils import (add_common_args, accuracy, load_classification, output_folder,
                           positive_int, quiet_hf_logging, trainable_parameters,
                           train_with_trainer)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, lr=2e-3)
    parser.add_argument("--r-first", type=positive_int, default=4, help="rank of the first block (default %(default)s)")
    parser.add_argument("--r-last", type=positive_int, default=12, help="rank of the last block (default %(default)s)")
    parser.add_argument("--final-sparsity", type=float, default=0.5,
                        help="fraction of each row of A pruned at the end, in [0, 1) (default %(default)s)")
    parser.add_argument("--prune-every", type=positive_int, default=None,
                        help="optimizer steps between pruning events (default: 10%% of the steps)")
    parser.add_argument("--prune-end", type=positive_int, default=None,
                        help="step at which the final sparsity is reached (default: 70%% of the steps)")
    parser.add_argument("--target-modules", nargs="+", default=["query", "value"],
                        help="modules to adapt (default: %(default)s, MiniLM/BERT names)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.final_sparsity < 1.0:
        parser.error(f"argument --final-sparsity: must be in [0, 1), got {args.final_sparsity}")
    return args


def total_steps(args: argparse.Namespace, train_rows: int) -> int:
    return args.max_steps or math.ceil(args.epochs * math.ceil(train_rows / args.batch_size))


class SparsityLog(TrainerCallback):
    """Print the mean, min and max sparsity of A after every pruning event (and the first step)."""

    def __init__(self, model):
        self.model = model
        self.last = None

    def on_step_end(self, args, state, control, **kwargs):
        sparsity = list(prilora_sparsity(self.model).values())
        summary = (round(sum(sparsity) / len(sparsity), 4), round(min(sparsity), 4), round(max(sparsity), 4))
        if summary != self.last:
            print(f"step {prilora_step(self.model):4d}: sparsity of A mean {summary[0]:.4f} "
                  f"(min {summary[1]:.4f}, max {summary[2]:.4f})")
            self.last = summary


def block_of(name: str) -> int:
    found = re.search(r"\.layers?\.(\d+)\.", name) or re.search(r"\.h\.(\d+)\.", name)
    return int(found.group(1)) if found else -1


def check(args, model, steps: int, prune_end: int) -> None:
    ranks = prilora_ranks(model)
    by_block = sorted((block_of(name), r) for name, r in ranks.items())
    in_order = [r for _, r in by_block]
    if in_order != sorted(in_order) or in_order[0] != args.r_first or in_order[-1] != args.r_last:
        sys.exit(f"MISMATCH: ranks by depth {in_order} do not rise from {args.r_first} to {args.r_last}")
    print(f"OK: ranks rise with depth from {in_order[0]} to {in_order[-1]}")
    if steps >= prune_end:
        sparsity = prilora_sparsity(model)
        off = {n: s for n, s in sparsity.items() if not 0.0 <= args.final_sparsity - s < 0.05}
        if off:
            sys.exit(f"MISMATCH: after step {prune_end} these modules are not at sparsity {args.final_sparsity}: {off}")
        print(f"OK: every module reached the final sparsity {args.final_sparsity} (step {steps} >= {prune_end})")


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_hf_logging()
    base, tokenizer, train, evald, _ = load_classification(args)
    steps = total_steps(args, len(train))
    prune_every = args.prune_every or max(1, steps // 10)
    prune_end = args.prune_end or max(1, round(0.7 * steps))
    config = PriLoraConfig(r_first=args.r_first, r_last=args.r_last, lora_alpha=8, target_modules=args.target_modules,
                           task_type="SEQ_CLS", final_sparsity=args.final_sparsity, prune_every=prune_every,
                           prune_start=0, prune_end=prune_end)
    model = get_peft_model(base, config)
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable} of {total}")
    print(f"pruning: every {prune_every} steps towards sparsity {args.final_sparsity} at step {prune_end} "
          f"(of {steps} steps)")
    print("ranks per module (prilora_ranks):")
    for name, r in prilora_ranks(model).items():
        print(f"  rank {r:2d}  {name.removeprefix('base_model.model.')}")

    with output_folder(args.output_dir) as out:
        trainer = train_with_trainer(model, tokenizer, train, args, out, callbacks=[SparsityLog(model)])
        print("final sparsity per module (prilora_sparsity):")
        for name, s in prilora_sparsity(model).items():
            print(f"  sparsity {s:.4f}  {name.removeprefix('base_model.model.')}")
        print(f"accuracy: {accuracy(trainer, evald):.4f} on {len(evald)} evaluation rows")
        check(args, model, prilora_step(model), prune_end)
        if args.output_dir is not None:
            model.save_pretrained(out / "prilora-adapter")
            print(f"saved adapter: {out / 'prilora-adapter'}")


if __name__ == "__main__":
    main()
