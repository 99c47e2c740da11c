"""HeteroLoRA: a proxy picks which LoRA modules (and, optionally, shortcuts) get the parameter budget.

What it shows:

1. ``HeteroLoraConfig(budget=0.25)``: of all candidates (the LoRA modules of ``target_modules``,
   plus LoRA-adapted shortcuts with ``--shortcuts``) exactly ``k = max(1, ⌊budget·n + ½⌋)`` are on.
2. No code of yours: the first ``proxy_batches`` optimizer steps score every candidate with the
   proxy (``grad_norm`` by default), then the top k stay on (``--mode static``) or are re-chosen
   every ``realloc_every`` steps on recent batches (``--mode dynamic``). ``--mode both`` (default)
   trains one model each way so the allocations can be compared.
3. ``heterolora_allocation`` reports which modules are on, their scores and the history of
   allocations; the script prints it and exits with status 1 unless exactly k candidates are on
   and every allocation in the history switched on k of them.

Full size (3 epochs per mode on the packaged MiniLM, 24 candidates)::

    python examples/heterolora_classification.py
    python examples/heterolora_classification.py --shortcuts residual_1 residual_2   # with shortcuts

Smoke test::

    python examples/heterolora_classification.py --max-steps 2 --max-train-samples 16 --max-eval-samples 16
"""

from __future__ import annotations

import argparse
import math
import sys

from peft import get_peft_model

from peft_lowrank_ext import HeteroLoraConfig, heterolora_allocation
from example_utils import (add_common_args, accuracy, load_base, load_classification,
                           output_folder, positive_float, positive_int, quiet_hf_logging, trainable_parameters,
                           train_with_trainer)

SHORTCUTS = ["residual_1", "residual_2", "shortcut_sa", "shortcut_ffn"]
PROXIES = ["grad_norm", "weight_grad_norm", "snip", "synflow", "alpha_test_delta", "constant"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, lr=2e-3)
    parser.add_argument("--mode", choices=["static", "dynamic", "both"], default="both",
                        help="allocate once, re-allocate during training, or train one model each way (default)")
    parser.add_argument("--budget", type=positive_float, default=0.25,
                        help="fraction of candidates switched on, in (0, 1] (default %(default)s)")
    parser.add_argument("--proxy", choices=PROXIES, default="grad_norm", help="zero-cost proxy (default %(default)s)")
    parser.add_argument("--proxy-batches", type=positive_int, default=None,
                        help="optimizer steps in the scoring window (default: 10%% of the steps, at most 4)")
    parser.add_argument("--realloc-every", type=positive_int, default=None,
                        help="dynamic mode: steps between re-allocations (default: 20%% of the steps)")
    parser.add_argument("--shortcuts", nargs="*", choices=SHORTCUTS, default=[],
                        help="LoRA-adapted shortcuts to add as candidates (default: none)")
    parser.add_argument("--r", type=positive_int, default=8, help="rank of every candidate (default %(default)s)")
    parser.add_argument("--target-modules", nargs="+", default=["query", "key", "value", "attention.output.dense"],
                        help="modules whose LoRA are candidates (default: %(default)s, MiniLM/BERT names)")
    args = parser.parse_args(argv)
    if args.budget > 1:
        parser.error(f"argument --budget: must be in (0, 1], got {args.budget}")
    return args


def train_one(args, mode: str, base, tokenizer, train, evald, out, proxy_batches: int, realloc_every: int):
    config = HeteroLoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=args.target_modules,
                              task_type="SEQ_CLS", shortcuts=list(args.shortcuts), budget=args.budget,
                              proxy=args.proxy, proxy_batches=proxy_batches, mode=mode,
                              realloc_every=realloc_every, seed=args.seed)
    model = get_peft_model(base, config)
    trainer = train_with_trainer(model, tokenizer, train, args, out / mode)
    return model, accuracy(trainer, evald)


def show_and_check(mode: str, allocation: dict, acc: float, trainable: int) -> None:
    n, on = allocation["candidates"], allocation["switched_on"]
    k = max(1, math.floor(allocation["budget"] * n + 0.5))
    print(f"[{mode}] allocation after {allocation['step']} steps: {on} of {n} candidates on "
          f"(budget {allocation['budget']} -> k = {k}), proxy {allocation['proxy']}, "
          f"{allocation['allocations']} allocation(s)")
    ranked = sorted(allocation["modules"].items(), key=lambda item: -item[1]["score"])
    for name, info in ranked:
        print(f"  {'ON ' if info['on'] else 'off'}  score {info['score']:.4g}  {info['kind']:<12} {name}")
    for event in allocation["history"]:
        print(f"  history: allocation {event['allocation']} after step {event['step']}: "
              f"{len(event['on'])} on{' (gradient-norm fallback)' if event['fallback'] else ''}")
    print(f"[{mode}] accuracy: {acc:.4f}, trainable params: {trainable}")
    wrong = [e["allocation"] for e in allocation["history"] if len(e["on"]) != k]
    if on != k or allocation["allocations"] < 1 or wrong:
        sys.exit(f"MISMATCH: [{mode}] expected exactly k = {k} candidates on after an allocation, got {on} "
                 f"({allocation['allocations']} allocations; wrong count in {wrong})")
    print(f"OK: [{mode}] exactly {k} of {n} candidates on in every allocation")


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_hf_logging()
    base, tokenizer, train, evald, data = load_classification(args)
    steps = args.max_steps or math.ceil(args.epochs * math.ceil(len(train) / args.batch_size))
    proxy_batches = args.proxy_batches or max(1, min(4, steps // 10))
    realloc_every = args.realloc_every or max(1, steps // 5)
    modes = ["static", "dynamic"] if args.mode == "both" else [args.mode]
    with output_folder(args.output_dir) as out:
        for i, mode in enumerate(modes):
            if i > 0:
                base, _ = load_base(args, data.num_labels)  # a fresh base: get_peft_model changed the first one
            model, acc = train_one(args, mode, base, tokenizer, train, evald, out, proxy_batches, realloc_every)
            show_and_check(mode, heterolora_allocation(model), acc, trainable_parameters(model)[0])
            if args.output_dir is not None:
                model.save_pretrained(out / f"heterolora-{mode}")


if __name__ == "__main__":
    main()
