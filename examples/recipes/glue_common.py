"""What the GLUE recipes share: the task table, LoRA's RoBERTa-base protocol, the data, the ``--tiny`` mode.

Full size: the model (default ``roberta-base``) and ``datasets.load_dataset("glue", TASK)`` from the Hub,
through :func:`peft_lowrank_ext.train.data.load_text_task` (sentence pairs and STS-B regression included).
``--tiny``: the same code path on a 2-layer RoBERTa built from a config (word-level tokenizer, saved to
a temporary folder) and a small synthetic data set with the task's own column names; two optimizer
steps per phase. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets

from peft_lowrank_ext.cli.arg_types import positive_int
from peft_lowrank_ext.train.data import load_text_task

#: task -> (text column, pair column or None, evaluation split); labels are GLUE's (STS-B: float scores)
GLUE_TASKS: dict[str, tuple[str, str | None, str]] = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "stsb": ("sentence1", "sentence2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
}
NUM_CLASSES = {"mnli": 3, "stsb": 1}

#: LoRA's RoBERTa-base GLUE protocol (Hu et al. 2021, appendix D, Table 9): AdamW, linear schedule,
#: warm-up ratio 0.06, batch 16, max length 512; per task (epochs, learning rate).
LORA_ROBERTA_BASE = {
    "mnli": (30, 5e-4), "sst2": (60, 5e-4), "mrpc": (30, 4e-4), "cola": (80, 4e-4),
    "qnli": (25, 4e-4), "qqp": (25, 5e-4), "rte": (80, 5e-4), "stsb": (40, 4e-4),
}
TINY_STEPS = 2


def parser(description: str, default_task: str = "rte") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--task", choices=sorted(GLUE_TASKS), default=default_task,
                   help="GLUE task (default %(default)s)")
    p.add_argument("--model", default="roberta-base", help="base model, hub id or folder (default %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="run the same code path on a tiny RoBERTa built from a config and synthetic data, in seconds")
    p.add_argument("--max-length", type=positive_int, default=512, help="tokens per example (default %(default)s)")
    p.add_argument("--max-train-samples", type=positive_int, default=None, help="use only the first N training rows")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--output-dir", default=None, help="where adapters and results.json go (default: runs/recipes/NAME)")
    return p


def device(args) -> str:
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"


def tiny_model(folder: Path) -> str:
    """A 2-layer RoBERTa classifier built from a config and a word-level tokenizer with a pair template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForSequenceClassification

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B:0 </s>:0",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])
    config = RobertaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=72, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, type_vocab_size=1)
    RobertaForSequenceClassification(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return str(folder)


TINY_WORDS = ["the", "a", "film", "food", "was", "is", "good", "bad", "great", "awful", "and", "not", "very"]


def tiny_glue(task: str, rows: int = 48, seed: int = 0) -> datasets.DatasetDict:
    """Synthetic rows with the task's GLUE column names (STS-B: float scores in [0, 5])."""
    text, pair, split_eval = GLUE_TASKS[task]
    rng = random.Random(seed)

    def split(n):
        cols: dict[str, list[Any]] = {text: [], "label": []}
        if pair:
            cols[pair] = []
        for i in range(n):
            cols[text].append(" ".join(rng.choice(TINY_WORDS) for _ in range(6)))
            if pair:
                cols[pair].append(" ".join(rng.choice(TINY_WORDS) for _ in range(5)))
            k = NUM_CLASSES.get(task, 2)
            cols["label"].append(round(rng.uniform(0, 5), 2) if k == 1 else i % k)
        cols["idx"] = list(range(n))
        return datasets.Dataset.from_dict(cols)

    return datasets.DatasetDict({"train": split(rows), split_eval: split(rows // 2)})


def load_glue(args, tmp: Path):
    """``(data, model)``: the GLUE task (hub or tiny) through ``load_text_task``, and the model to tune."""
    text, pair, split_eval = GLUE_TASKS[args.task]
    source: Any = tiny_glue(args.task, seed=args.seed) if args.tiny else "glue"
    data = load_text_task(source, text, pair, "label", task="regression" if args.task == "stsb" else "classification",
                          subset=None if args.tiny else args.task, split_eval=split_eval, seed=args.seed,
                          max_train_samples=args.max_train_samples)
    model = tiny_model(tmp / "tiny-roberta") if args.tiny else args.model
    print(f"data: {data.describe()}", file=sys.stderr)
    print(f"model: {model}", file=sys.stderr)
    return data, model


def steps_override(args) -> dict[str, Any]:
    """``--tiny``: every phase stops after two optimizer steps; full size: none."""
    return {"max_steps": TINY_STEPS, "progress": False} if args.tiny else {}


def output_dir(args, name: str) -> Path:
    out = Path(args.output_dir or f"runs/recipes/{name}-{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def scratch():
    return tempfile.TemporaryDirectory(prefix="peft-lowrank-recipe-")


def metric_line(result) -> str:
    if result.task == "regression":
        return f"Pearson {result.pearson:.4f}, Spearman {result.spearman:.4f}"
    return f"accuracy {100 * result.accuracy:.2f}%"


def write_results(out: Path, recipe: str, args, protocol: dict, results: dict[str, Any]) -> Path:
    """``results.json``: the recipe, the task, the protocol actually used and each phase's result."""
    payload = {"recipe": recipe, "task": args.task, "tiny": args.tiny, "model": "tiny-roberta" if args.tiny
               else args.model, "seed": args.seed, "protocol": protocol,
               "results": {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in results.items()}}
    path = out / "results.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path
