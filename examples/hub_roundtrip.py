"""Share an adapter through the Hugging Face Hub: ``push_to_hub``, then ``PeftModel.from_pretrained``.

What it shows:

1. A training run (3 epochs) of one method (default RLoRA) on the packaged MiniLM and the bundled data.
2. Publishing: with ``--repo-id USER/NAME`` the adapter goes to the Hub with PEFT's
   ``model.push_to_hub`` (which writes the adapter and a model card with ``save_pretrained`` into a
   temporary folder and uploads it); with ``--local-hub DIR`` it goes to ``DIR`` with
   ``save_pretrained`` instead — the folder a Hub repository would hold.
3. Fetching: ``PeftModel.from_pretrained(fresh_base, REPO_ID_OR_DIR)`` after ``import peft_lowrank_ext``
   (PEFT has no plugin discovery; without the import it fails with ``KeyError``). The reloaded
   model must give the trained model's logits; the script exits with status 1 otherwise.

Everything but the one publish call is the same code for both destinations. Without network or
login, ``--repo-id`` stops before training with a message saying why (no stack trace).

What the tests cover (they run offline): the ``--local-hub`` round trip end to end, and that
``--repo-id`` with ``HF_HUB_OFFLINE=1`` fails with that clear message. The upload to and download
from the real Hub are *not* exercised by the tests.

Full size (3 epochs)::

    python examples/hub_roundtrip.py --repo-id YOUR_NAME/minilm-rlora-reviews   # needs `hf auth login`
    python examples/hub_roundtrip.py --local-hub ./minilm-rlora-reviews

Smoke test::

    python examples/hub_roundtrip.py --local-hub /tmp/hub --max-steps 2 --max-train-samples 16 --max-eval-samples 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peft import PeftModel, get_peft_model

import peft_lowrank_ext  # noqa: F401  registers the methods with PEFT: needed to load their adapters
from example_utils import (DEFAULT_LR, SIMPLE_METHODS, add_common_args, accuracy, load_base,
                           load_classification, logits, output_folder, quiet_hf_logging, require_same_logits,
                           simple_method_config, train_with_trainer)

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo-id", help="Hub repository USER/NAME to push to and load from (needs network and login)")
    where.add_argument("--local-hub", help="folder standing in for the Hub repository (offline)")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    parser.add_argument("--token", default=None, help="Hub token (default: the one saved by `hf auth login`)")
    parser.add_argument("--method", choices=SIMPLE_METHODS, default="rlora", help="adapter method (default %(default)s)")
    add_common_args(parser, lr=None)
    args = parser.parse_args(argv)
    args.lr = args.lr or DEFAULT_LR[args.method]
    return args


def require_hub_access(args: argparse.Namespace) -> None:
    """Fail early, and readably, when the Hub cannot be reached, instead of after training."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        sys.exit(f"error: --repo-id {args.repo_id}: cannot push to the Hugging Face Hub because offline mode is on "
                 "(HF_HUB_OFFLINE=1). Unset it on a machine with network, or use --local-hub DIR to do the same "
                 "round trip through a local folder.")
    try:
        user = HfApi(token=args.token).whoami()
    except Exception as e:  # no network, DNS failure, no or invalid token: all mean "cannot push"
        sys.exit(f"error: --repo-id {args.repo_id}: cannot reach the Hugging Face Hub or not logged in "
                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). Run `hf auth login` "
                 "or pass --token, or use --local-hub DIR.")
    print(f"hub: logged in as {user.get('name', '?')}")


def publish(model, args: argparse.Namespace) -> str:
    """The one step that differs: upload to the Hub, or write the same files to the local folder."""
    if args.repo_id is not None:
        model.push_to_hub(args.repo_id, private=args.private, token=args.token,
                          commit_message=f"{args.method} adapter from peft-lowrank-ext's hub_roundtrip example")
        print(f"pushed: https://huggingface.co/{args.repo_id}")
        return args.repo_id
    model.save_pretrained(args.local_hub)
    files = sorted(p.name for p in Path(args.local_hub).iterdir())
    print(f"published to local hub folder {args.local_hub}: {files}")
    return args.local_hub


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.repo_id is not None:
        require_hub_access(args)
    quiet_hf_logging()
    base, tokenizer, train, evald, data = load_classification(args)
    model = get_peft_model(base, simple_method_config(args.method, len(train)))
    with output_folder(args.output_dir) as out:
        trainer = train_with_trainer(model, tokenizer, train, args, out)
        print(f"accuracy: {accuracy(trainer, evald):.4f} on {len(evald)} evaluation rows")
    location = publish(model, args)

    texts = list(data.eval["text"][:16])
    expected = logits(model, tokenizer, texts, args.max_length)
    fresh_base, _ = load_base(args, data.num_labels)
    fetched = PeftModel.from_pretrained(fresh_base, location, token=args.token)
    print(f"loaded back: {type(fetched.peft_config['default']).__name__} from {location}")
    require_same_logits(expected, logits(fetched, tokenizer, texts, args.max_length),
                        f"PeftModel.from_pretrained({location!r}) reproduces the trained model")


if __name__ == "__main__":
    main()
