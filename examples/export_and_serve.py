"""Train with a method of this package, export a plain LoRA, and serve it where the package is absent.

What it shows:

1. A short training run (default PRILoRA, whose pruned ranks depend on the depth) on the packaged
   MiniLM and the bundled data.
2. ``export_lora(model, DIR)``: an exact, standard PEFT LoRA folder (materialised A and B, no SVD) in
   the default ``layout="uniform"``: one global ``r`` (the largest kept rank; smaller modules are
   zero-padded, each module's scale is folded into B), no ``rank_pattern``, so that servers that read
   only ``r``/``lora_alpha`` (e.g. vLLM) load it exactly. For comparison it also writes
   ``layout="compact"`` (per-module ranks in ``rank_pattern``) and prints the per-module ranks it keeps;
   the uniform ``r`` must be their maximum.
3. A fresh Python process runs ``serve_exported_lora.py``, which imports only ``transformers`` and
   ``peft``; here it is started with an import blocker, so that any attempt to import
   ``peft_lowrank_ext`` fails. It loads the folder with ``PeftModel.from_pretrained``, prints the
   logits and serves the texts through a ``pipeline("text-classification")`` on the merged model.
4. The check: the served logits equal the trained adapter's within 1e-4 and the pipeline's labels
   are their argmax; the script exits with status 1 otherwise.

Full size (3 epochs)::

    python examples/export_and_serve.py --output-dir runs/export-example

Smoke test::

    python examples/export_and_serve.py --max-steps 2 --max-train-samples 16 --max-eval-samples 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from peft import get_peft_model

from peft_lowrank_ext import export_lora
from example_utils import (DEFAULT_LR, SIMPLE_METHODS, add_common_args, accuracy,
                           load_classification, logits, output_folder, positive_int, quiet_hf_logging,
                           require_same_logits, simple_method_config, train_with_trainer)

SERVE_SCRIPT = Path(__file__).with_name("serve_exported_lora.py")

# Run the serving script with `import peft_lowrank_ext` made impossible, to prove it is not needed.
WITHOUT_THIS_PACKAGE = """
import runpy, sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "peft_lowrank_ext" or name.startswith("peft_lowrank_ext."):
            raise ImportError("blocked: the exported adapter must load without peft_lowrank_ext")
sys.meta_path.insert(0, Blocker())
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=SIMPLE_METHODS, default="prilora", help="method to train (default %(default)s)")
    parser.add_argument("--serve-texts", type=positive_int, default=16,
                        help="evaluation texts served and compared (default %(default)s)")
    add_common_args(parser, lr=None)
    args = parser.parse_args(argv)
    args.lr = args.lr or DEFAULT_LR[args.method]
    return args


def serve_in_fresh_process(export_dir: Path, texts: list[str], num_labels: int, max_length: int, work: Path) -> dict:
    """Run ``serve_exported_lora.py`` in a new interpreter that cannot import this package."""
    texts_file, result_file = work / "texts.json", work / "served.json"
    texts_file.write_text(json.dumps(texts), encoding="utf-8")
    command = [sys.executable, "-c", WITHOUT_THIS_PACKAGE, str(SERVE_SCRIPT), str(export_dir),
               "--texts-file", str(texts_file), "--json-out", str(result_file),
               "--num-labels", str(num_labels), "--max-length", str(max_length)]
    done = subprocess.run(command, text=True, capture_output=True)
    print("---- serve_exported_lora.py (fresh process, transformers + peft only) ----")
    print(done.stdout.rstrip())
    if done.returncode != 0:
        print(done.stderr[-4000:], file=sys.stderr)
        sys.exit(f"MISMATCH: serving the exported adapter failed (exit status {done.returncode})")
    print("---- end of serving process ----")
    return json.loads(result_file.read_text(encoding="utf-8"))


def main(argv=None) -> None:
    args = parse_args(argv)
    quiet_hf_logging()
    base, tokenizer, train, evald, data = load_classification(args)
    model = get_peft_model(base, simple_method_config(args.method, len(train)))
    with output_folder(args.output_dir) as out:
        trainer = train_with_trainer(model, tokenizer, train, args, out)
        print(f"accuracy: {accuracy(trainer, evald):.4f} on {len(evald)} evaluation rows")

        export_dir = out / f"{args.method}-as-lora"
        lora_config = export_lora(model, export_dir)  # layout="uniform", the default
        compact = export_lora(model, out / f"{args.method}-as-lora-compact", layout="compact")
        ranks = sorted(set(compact.rank_pattern.values()) | {compact.r})
        print(f"exported plain LoRA (layout uniform) to {export_dir}: r={lora_config.r}, "
              f"lora_alpha={lora_config.lora_alpha}, {len(lora_config.target_modules)} modules")
        print(f"per-module ranks kept (layout compact): ranks used {ranks}")
        if lora_config.r != max(ranks) or lora_config.rank_pattern or lora_config.alpha_pattern:
            sys.exit(f"MISMATCH: the uniform export has r={lora_config.r}, rank_pattern={lora_config.rank_pattern}, "
                     f"alpha_pattern={lora_config.alpha_pattern}; expected r={max(ranks)} and no patterns")
        print(f"OK: the uniform export's r={lora_config.r} is the largest kept rank, without rank/alpha patterns")

        texts = list(data.eval["text"][: args.serve_texts])
        expected = logits(model.cpu(), tokenizer, texts, args.max_length)
        served = serve_in_fresh_process(export_dir, texts, data.num_labels, args.max_length, out)
        require_same_logits(expected, torch.tensor(served["logits"]),
                            "plain PEFT serves the exported adapter with the trained adapter's logits", atol=1e-4)
        check_labels(served["labels"], expected, model.config.id2label)


def check_labels(labels: list[str], expected, id2label: dict) -> None:
    """The pipeline's labels are the argmax of the trained logits (except near-ties, where rounding decides)."""
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    wanted = [id2label[int(i)] for i in expected.argmax(-1)]
    wrong = [i for i in range(len(wanted)) if clear[i] and labels[i] != wanted[i]]
    if len(labels) != len(wanted) or wrong:
        sys.exit(f"MISMATCH: pipeline labels {labels} differ from the argmax of the logits {wanted} at rows {wrong}")
    print(f"OK: the pipeline's {len(wanted)} labels are the argmax of the trained adapter's logits")


if __name__ == "__main__":
    main()
