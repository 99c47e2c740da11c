"""HeteroLoRA on OPT-350M for MRPC / RTE / SST-2 with the authors' settings (arXiv:2406.14956).

Settings (authors' code and configs, ``lora_global_synergies``): LoRA on q_proj and v_proj (r 8, α 16)
plus all four shortcut kinds (r 8, α 4), 25% of the candidates switched on, one combined ranking,
``grad_norm`` proxy on the first 32 batches of the unshuffled training set, dynamic re-allocation
every 0.2 epoch and at the start of every epoch (``timing="authors"``), AdamW lr 2e-4 (1e-4 for
SST-2), weight decay 0.01, 20 epochs, batch 4 (the authors: batch 4 on each of 2 GPUs). Data:
``datasets.load_dataset("glue", task)`` at full size, evaluated on the validation split.

    python examples/recipes/heterolora_opt_glue.py --task mrpc
    python examples/recipes/heterolora_opt_glue.py --tiny        # same code, tiny OPT + in-memory data, seconds

``--tiny`` builds a 2-layer post-LN OPT from ``OPTConfig`` and random token rows, and trains 2 epochs
of a few steps. Writes ``results.json`` (settings, accuracy, allocation history) to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from peft import get_peft_model

from peft_lowrank_ext import HeteroLoraConfig, HeteroLoraData, heterolora_allocation

TASKS = {"mrpc": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"), "sst2": ("sentence", None)}
LR = {"mrpc": 2e-4, "rte": 2e-4, "sst2": 1e-4}


def heterolora_config(steps_per_epoch: int) -> HeteroLoraConfig:
    return HeteroLoraConfig(
        task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16, lora_dropout=0.0,
        shortcuts=["residual_1", "residual_2", "shortcut_sa", "shortcut_ffn"], shortcut_r=8, shortcut_alpha=4,
        budget=0.25, ranking="combined", proxy="grad_norm", proxy_batches=32, mode="dynamic", timing="authors",
        realloc_every=0.2, steps_per_epoch=steps_per_epoch, seed=0)


def tiny_setup(seed: int):
    """A 2-layer post-LN OPT (as OPT-350M) and random token rows: the full code path, offline."""
    from transformers import OPTConfig, OPTForSequenceClassification

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=False,
                       dropout=0.0, attention_dropout=0.0, pad_token_id=1, num_labels=2)
    model = OPTForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed)

    def rows(n):
        ids = torch.randint(4, 64, (n, 12), generator=gen)
        labels = (ids[:, 0] > 33).long()  # learnable from the first token
        return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]

    return model, rows(24), rows(8)


def hub_setup(task: str, model_name: str, max_length: int):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    first, second = TASKS[task]
    data = load_dataset("glue", task)

    def rows(split):
        out = []
        for ex in data[split]:
            enc = tokenizer(ex[first], ex[second] if second else None, truncation=True, max_length=max_length)
            out.append({"input_ids": torch.tensor(enc["input_ids"]),
                        "attention_mask": torch.tensor(enc["attention_mask"]), "labels": torch.tensor(ex["label"])})
        return out

    return model, rows("train"), rows("validation")


def collate(rows, pad_id: int = 1):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), n), pad_id)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):  # right padding: OPT's classifier reads the last non-pad token
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = r["attention_mask"]
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([r["labels"] for r in rows])}


@torch.no_grad()
def accuracy(model, loader, device) -> float:
    model.eval()
    hits = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        hits += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    model.train()
    return hits / max(total, 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="mrpc")
    p.add_argument("--model", default="facebook/opt-350m")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output-dir", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny OPT from a config and in-memory data, 2 epochs")
    args = p.parse_args(argv)
    if args.tiny:
        model, train_rows, val_rows = tiny_setup(args.seed)
        args.epochs, args.device = 2, "cpu"
    else:
        model, train_rows, val_rows = hub_setup(args.task, args.model, args.max_length)
    torch.manual_seed(args.seed)
    train = torch.utils.data.DataLoader(train_rows, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    val = torch.utils.data.DataLoader(val_rows, batch_size=args.batch_size * 4, collate_fn=collate)
    config = heterolora_config(steps_per_epoch=len(train))
    model = get_peft_model(model, config).to(args.device)
    # The authors score on the first batches of the *unshuffled* training set, the same at every allocation.
    HeteroLoraData(train=train_rows, batch_size=args.batch_size, collate_fn=collate).attach(model)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR[args.task], weight_decay=0.01)
    model.train()
    for _ in range(args.epochs):
        for batch in train:
            loss = model(**{k: v.to(args.device) for k, v in batch.items()}).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    report = heterolora_allocation(model)
    acc = accuracy(model, val, args.device)
    k = report["switched_on"]
    ok = math.isfinite(loss.item()) and all(len(h["on"]) == k for h in report["history"])
    out = args.output_dir or Path("runs/recipes") / f"heterolora_opt-{'tiny' if args.tiny else args.task}"
    out.mkdir(parents=True, exist_ok=True)
    settings = {k2: v for k2, v in config.to_dict().items() if k2 in (
        "r", "lora_alpha", "shortcuts", "shortcut_r", "shortcut_alpha", "budget", "proxy", "proxy_batches", "mode",
        "timing", "realloc_every", "steps_per_epoch", "ranking", "target_modules")}
    settings["target_modules"] = sorted(settings["target_modules"])
    result = {"task": "tiny" if args.tiny else args.task, "accuracy": acc, "epochs": args.epochs,
              "lr": LR[args.task], "weight_decay": 0.01, "batch_size": args.batch_size, "heterolora": settings,
              "allocations": report["allocations"], "switched_on": k, "candidates": report["candidates"],
              "history": [{"step": h["step"], "on": h["on"]} for h in report["history"]]}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    model.save_pretrained(out / "adapter")
    print(f"accuracy {acc:.4f}; {k} of {report['candidates']} candidates on; {report['allocations']} allocations; "
          f"-> {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
