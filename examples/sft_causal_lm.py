"""TRL ``SFTTrainer`` with any of the four methods: ``SFTTrainer(peft_config=<our config>)``, one line.

What it shows:

1. A causal LM (``--model``: a hub id such as ``Qwen/Qwen2.5-0.5B`` or a local folder) fine-tuned
   on plain text rows (default: the texts of the bundled review data; ``--train-file`` takes a local
   CSV/JSON/JSONL/Parquet file with a ``text`` column) by TRL's ``SFTTrainer``, which wraps the
   model itself from ``peft_config`` — exactly as for PEFT's LoRA.
2. What each method needs beyond that line: RLoRA's PAC-Bayes term wants the training-set size;
   AutoLoRA's search wants held-out data (``callbacks=[AutoLoraSearch(held_out)]``, rows held out
   here from the training text) and ``autolora_select`` afterwards; PRILoRA and HeteroLoRA need
   nothing (their pruning / allocation run inside the optimizer step).
3. ``save_pretrained`` and ``AutoPeftModelForCausalLM.from_pretrained``: the reloaded model must give
   the trained model's logits (the script exits with status 1 otherwise).

Full size (one epoch on the 800 bundled review texts)::

    python examples/sft_causal_lm.py --model Qwen/Qwen2.5-0.5B --method rlora

Smoke test (the tests build a tiny Llama and tokenizer in a temporary folder)::

    python examples/sft_causal_lm.py --model TINY_DIR --method autolora --max-steps 2 --max-train-samples 16
"""

from __future__ import annotations

import argparse
import sys

import torch
from datasets import Dataset
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from peft_lowrank_ext import AutoLoraSearch, autolora_select, heterolora_allocation, pac_bayes_stats, prilora_sparsity
from peft_lowrank_ext.cli.recipes import peft_config
from peft_lowrank_ext.train.data import load_table, load_text_classification
from peft_lowrank_ext.train.models import default_target_modules
from example_utils import output_folder, positive_float, positive_int, quiet_hf_logging, require_same_logits

METHODS = ("rlora", "autolora", "prilora", "heterolora")
DEFAULT_LR = {"rlora": 1e-2, "autolora": 2e-4, "prilora": 2e-4, "heterolora": 2e-4}


def sft_parser(description: str, methods: tuple[str, ...], default_method: str, output_help: str):
    """The options of the SFT examples (this one and qlora_sft.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="causal LM: hub id or local folder (with its tokenizer)")
    parser.add_argument("--method", choices=methods, default=default_method, help="adapter method (default %(default)s)")
    parser.add_argument("--train-file", default=None,
                        help="local CSV/JSON/JSONL/Parquet file with a 'text' column (default: bundled review texts)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="modules to adapt (default: PEFT's LoRA defaults for the architecture)")
    parser.add_argument("--r", type=positive_int, default=8, help="adapter rank (default %(default)s)")
    parser.add_argument("--epochs", type=positive_float, default=1.0, help="training epochs (default %(default)s)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop after N steps (overrides --epochs)")
    parser.add_argument("--max-train-samples", type=positive_int, default=None, help="use only the first N rows")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="batch size (default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help=f"learning rate (default per method: {DEFAULT_LR})")
    parser.add_argument("--max-length", type=positive_int, default=128, help="tokens per row (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--output-dir", default=None, help=output_help)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return sft_parser(__doc__.split("\n\n")[0], METHODS, "rlora",
                      "where the adapter goes (default: a temporary folder)").parse_args(argv)


def load_texts(args: argparse.Namespace) -> Dataset:
    """The training text: a local file's ``text`` column, or the texts of the bundled review data."""
    if args.train_file is None:
        rows = load_text_classification().train.select_columns(["text"])
    else:
        rows = load_table(args.train_file, "train_file")
        if "text" not in rows.column_names:
            raise SystemExit(f"argument --train-file: {args.train_file!r} has no 'text' column; "
                             f"columns: {rows.column_names}")
        rows = rows.select_columns(["text"])
    if args.max_train_samples is not None:
        rows = rows.select(range(min(args.max_train_samples, len(rows))))
    return rows


def peft_config_for(method: str, args: argparse.Namespace, targets: list[str], n_train: int):
    """The method's config (e.g. ``RLoraConfig(r=8, lora_alpha=16, projection_ratio=0.05, ...)``)."""
    r = args.r
    prune_end = max(1, n_train // args.batch_size // 2)  # PRILoRA: half of the first epoch
    settings = {
        "rlora": dict(r=r, lora_alpha=2 * r, projection_ratio=0.05, pac_bayes_weight=0.1, num_train_examples=n_train,
                      seed=args.seed),
        "autolora": dict(r=r, lora_alpha=r, hypergradient="first_order"),
        "prilora": dict(r_first=max(1, r // 2), r_last=r * 3 // 2, lora_alpha=2 * r, prune_every=max(1, prune_end // 5),
                        prune_start=0, prune_end=prune_end, final_sparsity=0.5),
        "heterolora": dict(r=r, lora_alpha=2 * r, budget=0.5, proxy_batches=1, seed=args.seed),
    }[method]
    return peft_config(method, target_modules=targets, task_type="CAUSAL_LM", **settings)


def summary(method: str, model) -> str:
    """One line with what the method did during training."""
    if method == "rlora":
        return "pac-bayes: " + ", ".join(f"{k}={float(v):.4g}" for k, v in pac_bayes_stats(model).items())
    if method == "autolora":
        ranks = autolora_select(model)
        return f"autolora ranks: {sorted(ranks.values())}"
    if method == "prilora":
        sparsity = list(prilora_sparsity(model).values())
        return f"prilora mean sparsity of A: {sum(sparsity) / len(sparsity):.4f}"
    allocation = heterolora_allocation(model)
    return f"heterolora: {allocation['switched_on']} of {allocation['candidates']} modules on"


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_hf_logging()
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model)
    targets = args.target_modules or default_target_modules(model)

    texts = load_texts(args)
    callbacks = []
    if args.method == "autolora":  # the search trains β on rows the adapter weights never see
        split = texts.train_test_split(test_size=0.25, seed=args.seed)
        texts, held_out_text = split["train"], split["test"]
        held_out = held_out_text.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
                                     batched=True, remove_columns=["text"])
        callbacks.append(AutoLoraSearch(held_out, batch_size=args.batch_size))
    config = peft_config_for(args.method, args, targets, len(texts))
    print(f"model: {args.model}; method: {args.method}; targets: {targets}; {len(texts)} training rows")

    with output_folder(args.output_dir) as out:
        sft_args = SFTConfig(output_dir=str(out / "trainer"), max_length=args.max_length, dataset_text_field="text",
                             num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
                             per_device_train_batch_size=args.batch_size, learning_rate=args.lr or DEFAULT_LR[args.method],
                             logging_steps=10, save_strategy="no", report_to="none", seed=args.seed,
                             dataloader_num_workers=0,
                             bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())  # TRL's default needs a GPU
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=texts, processing_class=tokenizer,
                             peft_config=config, callbacks=callbacks)
        peft_model = trainer.model
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        print(f"trainable params: {trainable}")
        result = trainer.train()
        print(f"train loss: {result.training_loss:.4f} after {result.global_step} steps")
        print(summary(args.method, peft_model))

        adapter_dir = out / f"{args.method}-adapter"
        peft_model.save_pretrained(adapter_dir)
        print(f"saved adapter: {adapter_dir}")
        batch = tokenizer(list(texts["text"][:4]), truncation=True, max_length=args.max_length, padding=True,
                          return_tensors="pt")
        peft_model.eval()
        with torch.no_grad():
            device = next(peft_model.parameters()).device
            expected = peft_model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
            reloaded = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).to(device).eval()
            actual = reloaded(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        require_same_logits(expected, actual, "AutoPeftModelForCausalLM.from_pretrained reproduces the trained model",
                            atol=1e-4)


if __name__ == "__main__":
    sys.exit(main())
