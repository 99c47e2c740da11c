"""Serve predictions from an exported adapter with nothing but ``transformers`` and ``peft``.

``export_lora`` (see ``export_and_serve.py``) writes a standard PEFT LoRA folder, so whoever uses the
adapter does not need ``peft_lowrank_ext``: this script never imports it. It loads the base model
named in the adapter's config (or ``--base``), attaches the adapter with ``PeftModel.from_pretrained``,
prints the logits, merges the adapter into the weights and serves the texts through a transformers
``pipeline("text-classification")``.

    python examples/serve_exported_lora.py EXPORTED_DIR "What a lovely hotel." "The soup was cold."

``--json-out FILE`` writes ``{"logits": [[...]], "labels": [...]}`` for programs that check it.
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", help="folder written by export_lora (a plain LoRA adapter)")
    parser.add_argument("texts", nargs="*", help="texts to classify")
    parser.add_argument("--texts-file", default=None, help="JSON file with a list of texts (added to TEXTS)")
    parser.add_argument("--base", default=None, help="base model (default: base_model_name_or_path of the adapter)")
    parser.add_argument("--num-labels", type=int, default=2, help="classes of the classification head (default 2)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text (default %(default)s)")
    parser.add_argument("--json-out", default=None, help="write the logits and pipeline labels to this JSON file")
    args = parser.parse_args(argv)
    if args.texts_file:
        with open(args.texts_file, encoding="utf-8") as f:
            args.texts += json.load(f)
    if not args.texts:
        parser.error("give at least one text (TEXTS or --texts-file)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    base_path = args.base or PeftConfig.from_pretrained(args.adapter).base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=args.num_labels)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    print(f"loaded {type(model.peft_config['default']).__name__} from {args.adapter} on {base_path}")

    batch = tokenizer(args.texts, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits.float()

    serve = pipeline("text-classification", model=model.merge_and_unload(), tokenizer=tokenizer,
                     truncation=True, max_length=args.max_length)
    predictions = serve(args.texts)
    for text, row, prediction in zip(args.texts, logits.tolist(), predictions):
        print(f"{prediction['label']:>8} ({prediction['score']:.3f})  logits {[round(v, 4) for v in row]}  {text[:60]}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"logits": logits.tolist(), "labels": [p["label"] for p in predictions]}, f)


if __name__ == "__main__":
    main()
