"""AutoLoRA end to end: search ranks on held-out data, threshold them, retrain a plain LoRA with them.

What it shows:

1. Search: ``AutoLoraConfig`` wraps the model; ``Trainer`` trains A and B on one part of the
   training set while ``callbacks=[AutoLoraSearch(held_out)]`` feeds the other part to the
   selection variables β (bi-level step at every optimizer step).
2. Threshold: ``autolora_select`` keeps the components with α_j ≥ 1/r (at least one per module)
   and returns the rank found for every module.
3. Retrain: ``retrain_lora_config`` turns those ranks into a PEFT ``LoraConfig`` with a
   ``rank_pattern``; a fresh base model is trained with it on the whole training set.

``--one-call`` does the same three steps with ``run_autolora`` (the library's one-call pipeline).
The script checks that every rank found is an integer in 1..r and that the retrained LoRA has
exactly those ranks, and exits with status 1 otherwise.

Full size (3 search epochs + 3 retrain epochs on the packaged MiniLM)::

    python examples/autolora_search_retrain.py

Smoke test::

    python examples/autolora_search_retrain.py --max-steps 2 --max-train-samples 16 --max-eval-samples 16
"""

from __future__ import annotations

import argparse
import sys

from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import DataCollatorWithPadding, Trainer

from peft_lowrank_ext import AutoLoraConfig, AutoLoraSearch, autolora_select, retrain_lora_config, run_autolora
from example_utils import (add_common_args, adamw_with_head_lr, accuracy, load_base, load_classification,
                           output_folder, positive_float, positive_int, quiet_hf_logging, trainable_parameters,
                           training_arguments, train_with_trainer)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, lr=2e-3)
    parser.add_argument("--r", type=positive_int, default=8, help="search rank per module (default %(default)s)")
    parser.add_argument("--hypergradient", choices=["darts_real_step", "darts_virtual_sgd", "first_order"],
                        default="first_order",
                        help="β's hypergradient: first_order (default, the cheapest), the authors' darts_real_step, "
                             "or darts_virtual_sgd")
    parser.add_argument("--arch-lr", type=positive_float, default=1e-2,
                        help="Adam learning rate of β (default %(default)s)")
    parser.add_argument("--held-out-fraction", type=positive_float, default=0.3,
                        help="share of the training rows used as held-out data for β (default %(default)s)")
    parser.add_argument("--target-modules", nargs="+", default=["query", "value"],
                        help="modules to adapt (default: %(default)s, MiniLM/BERT names)")
    parser.add_argument("--one-call", action="store_true", help="run the pipeline with run_autolora instead")
    args = parser.parse_args(argv)
    if not args.held_out_fraction < 1:
        parser.error(f"argument --held-out-fraction: must be in (0, 1), got {args.held_out_fraction}")
    return args


def search_config(args: argparse.Namespace) -> AutoLoraConfig:
    return AutoLoraConfig(r=args.r, lora_alpha=args.r, target_modules=args.target_modules, task_type="SEQ_CLS",
                          hypergradient=args.hypergradient, arch_lr=args.arch_lr,
                          held_out_fraction=args.held_out_fraction)


def step_by_step(args, base, tokenizer, train, out):
    """Search → select → retrain written out, returning ``(retrained_model, ranks)``."""
    collator = DataCollatorWithPadding(tokenizer)
    split = train.train_test_split(test_size=args.held_out_fraction, seed=args.seed)
    print(f"search: {len(split['train'])} rows train A and B, {len(split['test'])} held-out rows train beta")

    search_model = get_peft_model(base, search_config(args))
    Trainer(model=search_model, args=training_arguments(args, out / "search"), train_dataset=split["train"],
            data_collator=collator, callbacks=[AutoLoraSearch(split["test"], batch_size=args.batch_size)],
            optimizers=(adamw_with_head_lr(search_model, args.lr, args.head_lr), None)).train()
    ranks = autolora_select(search_model)

    lora_config = retrain_lora_config(search_model)
    fresh_base, _ = load_base(args, base.config.num_labels)
    retrained = get_peft_model(fresh_base, lora_config)
    train_with_trainer(retrained, tokenizer, train, args, out / "retrain")
    return retrained, ranks


def one_call(args, base, tokenizer, train, out):
    """The same pipeline through ``run_autolora`` (it splits off the held-out rows itself)."""
    num_labels = base.config.num_labels
    return run_autolora(lambda: load_base(args, num_labels)[0], search_config(args), train,
                        training_arguments(args, out / "run_autolora"),
                        data_collator=DataCollatorWithPadding(tokenizer))


def check_ranks(ranks: dict[str, int], retrained, r: int) -> None:
    """Every rank is an integer in 1..r, and the retrained LoRA layers have exactly those ranks."""
    bad = {name: k for name, k in ranks.items() if not (isinstance(k, int) and 1 <= k <= r)}
    if not ranks or bad:
        sys.exit(f"MISMATCH: ranks outside 1..{r}: {bad or 'no modules'}")
    built = {name.removeprefix("base_model.model."): module.r["default"]
             for name, module in retrained.named_modules() if isinstance(module, LoraLayer)}
    wanted = {name.removeprefix("base_model.model."): k for name, k in ranks.items()}
    if built != wanted:
        sys.exit(f"MISMATCH: the retrained LoRA has ranks {built}, the search found {wanted}")
    print(f"OK: the retrained LoRA has the {len(ranks)} ranks the search found")


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_hf_logging()
    base, tokenizer, train, evald, _ = load_classification(args)
    with output_folder(args.output_dir) as out:
        retrained, ranks = (one_call if args.one_call else step_by_step)(args, base, tokenizer, train, out)
        print(f"ranks found (threshold 1/r = {1 / args.r:.3f}, search rank {args.r}):")
        for name, k in ranks.items():
            print(f"  rank {k:2d}  {name.removeprefix('base_model.model.')}")
        print(f"mean rank: {sum(ranks.values()) / len(ranks):.2f} of {args.r}")
        check_ranks(ranks, retrained, args.r)
        trainable, total = trainable_parameters(retrained)
        print(f"retrained LoRA trainable params: {trainable} of {total}")
        evaluator = Trainer(model=retrained, args=training_arguments(args, out / "eval"),
                            data_collator=DataCollatorWithPadding(tokenizer))
        print(f"accuracy: {accuracy(evaluator, evald):.4f} on {len(evald)} evaluation rows")
        if args.output_dir is not None:
            retrained.save_pretrained(out / "retrained-lora")
            print(f"saved retrained LoRA: {out / 'retrained-lora'}")


if __name__ == "__main__":
    main()
