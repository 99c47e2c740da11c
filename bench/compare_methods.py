"""Accuracy and cost of every method against PEFT's own, over several seeds, from one command.

    python bench/compare_methods.py                                  # packaged MiniLM, bundled data
    python bench/compare_methods.py --seeds 0 1 2 --epochs 2
    python bench/compare_methods.py --dataset glue --subset sst2 --text-column sentence \\
        --label-column label --max-train-samples 2000                 # any `datasets` data set
    python bench/compare_methods.py --methods lora_r8 rlora --max-steps 2 --seeds 0   # smoke run

Methods: PEFT LoRA r=2 and r=8, PEFT AdaLoRA, PEFT VeRA, full fine-tuning, RLoRA, AutoLoRA (search
on 70% of the training set with the other 30% as held-out data, then a plain LoRA retrain with the
selected ranks on all of it; both phases are timed), PRILoRA, HeteroLoRA static and dynamic.

Every run goes through the package's one training loop, :func:`peft_lowrank_ext.train.loop.fit`
(AdamW, linear warm-up/decay, gradient clipping, accuracy on the evaluation split). Per-step work
that PEFT leaves to the caller (AdaLoRA's ``update_and_allocate``) hangs on the package's global
optimizer-step hooks (:mod:`peft_lowrank_ext.runtime.step_hooks`), so the loop stays unchanged.

Each (method, seed) runs in its own forked child process (the parent imports the libraries once)
so that its peak resident memory is its own (the kernel's high-water mark is also reset before the
run); seeds are the outer loop. Results go to
``--output-dir/compare.json`` (every per-seed number, the machine, versions, date, exact command
and load averages) after every finished seed, and ``compare.md`` is rendered from it at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/compare_methods.py`: import from the repository root, not bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import (  # noqa: E402
    RESULTS_DIR,
    load_average,
    machine_info,
    now_iso,
    offline,
    peak_rss_bytes,
    reset_peak_rss,
)

offline(hub="--dataset" not in sys.argv)

METHODS = ("lora_r2", "lora_r8", "adalora", "vera", "full_ft", "rlora", "autolora", "autolora_first_order",
           "autolora_every10", "prilora",
           "heterolora_static", "heterolora_dynamic")
SCHEMA = "peft-lowrank-ext/compare/1"
DEFAULT_OUTPUT_DIR = RESULTS_DIR

# HeteroLoRA's candidate set per architecture (its tuned default in bench/heterolora.py): every
# attention projection; the other methods adapt PEFT's LoRA defaults (BERT/MiniLM: query, value).
HETERO_TARGETS = {("query", "value"): ["query", "key", "value", "attention.output.dense"],
                  ("q_proj", "v_proj"): ["q_proj", "k_proj", "v_proj", "o_proj"]}


def exact_command(argv: list[str]) -> str:
    return "python bench/" + Path(__file__).name + ("" if not argv else " " + shlex.join(argv))


# ----- data -----------------------------------------------------------------------------------------
def load_data(args):
    """The bundled data, local files, or a ``datasets`` data set (``--dataset``), as text + label."""
    from peft_lowrank_ext.train.data import TextClassificationData, load_text_classification

    if args.dataset is None:
        return load_text_classification(args.train_file, args.eval_file, args.text_column, args.label_column,
                                        text_pair_column=args.text_pair_column,
                                        max_train_samples=args.max_train_samples,
                                        max_eval_samples=args.max_eval_samples)
    if args.train_file or args.eval_file:
        raise ValueError("--dataset and --train-file/--eval-file: give one source of data, not both")
    import datasets

    from peft_lowrank_ext.train.data import limit_rows, normalise_columns

    try:
        loaded = datasets.load_dataset(args.dataset, args.subset)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes an argument error
        raise ValueError(f"--dataset {args.dataset!r} (--subset {args.subset!r}): cannot load it: {e}") from e
    for split, opt in ((args.train_split, "--train-split"), (args.eval_split, "--eval-split")):
        if split not in loaded:
            raise ValueError(f"{opt} {split!r}: not a split of {args.dataset!r}; available: {list(loaded)}")
    pair = dict(text_pair_column=args.text_pair_column)
    train = normalise_columns(loaded[args.train_split], args.text_column, args.label_column, "train_file", **pair)
    evald = normalise_columns(loaded[args.eval_split], args.text_column, args.label_column, "eval_file", **pair)
    train = limit_rows(train.shuffle(seed=0), args.max_train_samples, "max_train_samples")
    evald = limit_rows(evald, args.max_eval_samples, "max_eval_samples")
    num_labels = max(train["label"]) + 1
    source = f"datasets:{args.dataset}" + (f"/{args.subset}" if args.subset else "") + \
        f" ({args.train_split} / {args.eval_split})"
    return TextClassificationData(train=train, eval=evald, num_labels=num_labels, source=source)


# ----- method settings ------------------------------------------------------------------------------
def tuned_defaults() -> dict[str, Any]:
    """Learning rates and sizes: the CLI's defaults where it has them, else the per-method benches'."""
    from peft_lowrank_ext.cli import main as cli

    def pick(name: str, fallback):
        return getattr(cli, name, fallback), ("peft_lowrank_ext.cli.main." + name if hasattr(cli, name)
                                             else "bench default (see bench/README.md)")

    out = {}
    for key, name, fallback in (("r", "DEFAULT_R", 8), ("lr", "DEFAULT_LR", 2e-3),
                                ("rlora_lr", "DEFAULT_RLORA_LR", 3e-2),
                                ("projection_ratio", "DEFAULT_PROJECTION_RATIO", 0.05),
                                ("pac_bayes_weight", "DEFAULT_PAC_BAYES_WEIGHT", 0.1),
                                ("batch_size", "DEFAULT_BATCH_SIZE", 16), ("max_length", "DEFAULT_MAX_LENGTH", 64)):
        out[key], out[key + "_source"] = pick(name, fallback)
    return out


def method_settings(method: str, d: dict[str, Any], total_steps: int, steps_per_epoch: int, targets: list[str],
                    n_train: int, seed: int) -> dict[str, Any]:
    """``{"config": kwargs, "lr", "head_lr", "why"}`` of one method; ``config`` is None for full FT."""
    r, lr = d["r"], d["lr"]
    if method in ("lora_r2", "lora_r8"):
        rr = 2 if method == "lora_r2" else 8
        return {"config": dict(r=rr, lora_alpha=2 * rr, target_modules=targets), "lr": lr, "head_lr": lr,
                "why": "the CLI's LoRA settings (alpha = 2r, lr tuned on the bundled data)"}
    if method == "adalora":
        tinit, tfinal = max(1, total_steps // 10), max(1, total_steps // 5)
        if tinit + tfinal >= total_steps:  # very short runs: allocate at once, no budget ramp
            tinit, tfinal = 0, 0
        return {"config": dict(init_r=12, target_r=r, lora_alpha=2 * r, target_modules=targets, tinit=tinit,
                               tfinal=tfinal, deltaT=max(1, total_steps // 20), total_step=total_steps,
                               beta1=0.85, beta2=0.85, orth_reg_weight=0.1),
                "lr": 1e-2, "head_lr": lr,
                "why": "AdaLoRA paper's GLUE recipe scaled to this run: start at r=12, prune to an average "
                       "r=8 (LoRA r=8's budget), warm-up 10% and final 20% of the steps, 20 reallocations, "
                       "orthogonal regularizer 0.1 (the paper's GLUE value). With PEFT's default 0.5 and LoRA's "
                       "lr 2e-3 it stayed at chance in all 3 seeds (the regularizer's gradient dominates the "
                       "clipped norm); lr 1e-2 with 0.1 was tried on seed 0 only (74.5% without allocation)"}
    if method == "vera":
        return {"config": dict(r=256, target_modules=targets, d_initial=0.1, save_projection=True,
                               projection_prng_key=seed),
                "lr": 5e-2, "head_lr": 1e-2,
                "why": "VeRA paper's GLUE setting r=256; lr 5e-2 for the scaling vectors and 1e-2 for the head "
                       "(1e-2 / 2e-3 stayed at chance in all 3 seeds; 5e-2 / 1e-2 was tried on seed 0 only: "
                       "88.5%); the shared random projection is saved with the adapter"}
    if method == "full_ft":
        return {"config": None, "lr": 1e-4, "head_lr": 1e-4,
                "why": "every weight trained at 1e-4 (a common BERT-small fine-tuning lr; not tuned here)"}
    if method == "rlora":
        return {"config": dict(r=r, lora_alpha=2 * r, target_modules=targets, seed=seed,
                               projection_ratio=d["projection_ratio"], pac_bayes_weight=d["pac_bayes_weight"],
                               num_train_examples=n_train),
                "lr": d["rlora_lr"], "head_lr": lr, "why": "the CLI's RLoRA defaults"}
    if method in ("autolora", "autolora_first_order", "autolora_every10"):
        hypergradient = "first_order" if method == "autolora_first_order" else "darts_real_step"
        every = 10 if method == "autolora_every10" else 1
        return {"config": dict(r=r, lora_alpha=2 * r, target_modules=targets, arch_lr=1e-2,
                               held_out_fraction=0.3, hypergradient=hypergradient, search_every=every),
                "lr": lr, "head_lr": lr,
                "why": f"{hypergradient} search at r=8 with β updated every {every} step(s) at Adam lr 1e-2 "
                       "(bench/autolora.py), the head as initialised (the authors'), 30% of the training set "
                       "held out; retrain LoRA (dropout 0.1) with the selected ranks on all of it"}
    if method == "prilora":
        return {"config": dict(r_first=4, r_last=12, lora_alpha=2 * r, target_modules=targets,
                               prune_every=max(1, total_steps // 30), prune_start=total_steps // 10,
                               prune_end=max(total_steps // 10 + 1, int(0.7 * total_steps)), final_sparsity=0.5),
                "lr": lr, "head_lr": lr,
                "why": "bench/prilora.py: ranks 4→12 (mean 8), prune 50% of A from 10% to 70% of training"}
    if method in ("heterolora_static", "heterolora_dynamic"):
        hetero_targets = HETERO_TARGETS.get(tuple(sorted(targets)), targets)
        cfg = dict(r=r, lora_alpha=2 * r, target_modules=hetero_targets, budget=0.25, proxy="grad_norm",
                   proxy_batches=min(2, max(1, total_steps - 1)), seed=seed)
        if method == "heterolora_dynamic":
            cfg.update(mode="dynamic", realloc_every=max(1, math.ceil(0.1 * steps_per_epoch)))
        return {"config": cfg, "lr": lr, "head_lr": lr,
                "why": "bench/heterolora.py: 25% of the attention projections on at r=8 (as many adapter "
                       "parameters as LoRA r=2 on all of them), grad_norm proxy"
                       + ("; re-allocate every 10% of an epoch" if method == "heterolora_dynamic" else "")}
    raise ValueError(f"--methods: {method!r} is not allowed; choose from {', '.join(METHODS)}")


#: this benchmark's variants -> the method (recipes.config_class) whose config they are
VARIANT_OF = {"lora_r2": "lora", "lora_r8": "lora", "heterolora_static": "heterolora",
              "heterolora_dynamic": "heterolora"}


def build_peft_config(method: str, config: dict[str, Any]):
    from peft_lowrank_ext.cli.recipes import peft_config

    return peft_config(VARIANT_OF.get(method, method), task_type="SEQ_CLS", **config)


# ----- one run --------------------------------------------------------------------------------------
class FullFineTune:
    """Lets :func:`fit` train a plain model: every parameter trainable, the whole state dict 'saved'."""

    def __new__(cls, net):
        import torch
        from types import SimpleNamespace

        class _Wrapper(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model
                self.active_adapter = "default"
                self.peft_config = {"default": SimpleNamespace(target_modules="all parameters")}

            def forward(self, **batch):
                return self.model(**batch)

            def save_pretrained(self, folder):
                from safetensors.torch import save_file

                from peft_lowrank_ext.train.run import ADAPTER_FILE

                state = {k: v.contiguous() for k, v in self.model.state_dict().items()}
                save_file(state, str(Path(folder) / ADAPTER_FILE))

        for p in net.parameters():
            p.requires_grad_(True)
        return _Wrapper(net)


def _training_config(args, settings: dict[str, Any], seed: int):
    from peft_lowrank_ext.train.run import TrainingConfig

    return TrainingConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                          max_length=args.max_length, lr=settings["lr"], head_lr=settings["head_lr"], seed=seed,
                          progress=False)


def _wrapped(method: str, config: dict[str, Any] | None, data, model_path, seed: int):
    """The model and tokenizer as :func:`train_classifier` builds them (same seeding)."""
    from peft_lowrank_ext.train.models import load_model_and_tokenizer, set_seed, wrap_classifier

    if config is not None:
        return wrap_classifier(build_peft_config(method, config), model_path, data.num_labels, seed)
    set_seed(seed)
    net, tokenizer = load_model_and_tokenizer(model_path, data.num_labels)
    set_seed(seed)
    return FullFineTune(net), tokenizer


def attach_adalora_allocation(peft_model) -> dict[str, int]:
    """Call AdaLoRA's ``update_and_allocate(step)`` after every optimizer step (grads still there)."""
    from peft_lowrank_ext.runtime.step_hooks import register_step_callbacks

    counter = {"step": 0, "calls": 0}

    def post(model, optimizer):
        model.base_model.update_and_allocate(counter["step"])
        counter["step"] += 1
        counter["calls"] += 1

    register_step_callbacks(peft_model, "bench-adalora", post=post)
    return counter


def _result_fields(result) -> dict[str, Any]:
    keys = ("accuracy", "eval_loss", "trainable_params", "total_params", "adapter_bytes", "optimizer_state_bytes",
            "train_time_s", "time_per_step_s", "median_step_s", "steps", "epochs", "lr", "head_lr",
            "final_train_loss")
    return {k: getattr(result, k) for k in keys}


def run_one(method: str, seed: int, data, args, defaults: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one method with one seed; every number of that run."""
    import torch

    from peft_lowrank_ext.train.loop import fit

    steps_per_epoch = math.ceil(len(data.train) / args.batch_size)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    targets = resolve_targets(args, data.num_labels)
    settings = method_settings(method, defaults, total_steps, steps_per_epoch, targets, len(data.train), seed)
    row: dict[str, Any] = {"method": method, "seed": seed, "load_average_start": load_average(),
                           "started": now_iso(), "settings": settings}
    reset_peak_rss()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.startswith("autolora"):
            row.update(_run_autolora(settings, data, args, seed))
        else:
            model, tokenizer = _wrapped(method, settings["config"], data, args.model, seed)
            counter = attach_adalora_allocation(model) if method == "adalora" else None
            result = fit(model, tokenizer, data, _training_config(args, settings, seed), method=method)
            row.update(_result_fields(result))
            row["target_modules"] = result.extra.get("target_modules")
            if counter is not None:
                row["adalora_update_and_allocate_calls"] = counter["calls"]
                row["adalora_final_rank_pattern_sizes"] = _adalora_ranks(model)
            if method.startswith("heterolora"):
                from peft_lowrank_ext import heterolora_allocation

                alloc = heterolora_allocation(model)
                row["heterolora_on"] = sorted(n for n, v in alloc["modules"].items() if v["on"])
            del model
    row["wall_s"] = time.perf_counter() - t0
    row["peak_rss_bytes"] = peak_rss_bytes()
    row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    row["load_average_end"] = load_average()
    return row


_TARGETS_CACHE: dict[Any, list[str]] = {}


def resolve_targets(args, num_labels: int) -> list[str]:
    """``--target-modules`` or PEFT's LoRA defaults for the model (looked up once per process)."""
    if args.target_modules:
        return list(args.target_modules)
    if args.model not in _TARGETS_CACHE:
        from types import SimpleNamespace

        from transformers import AutoConfig

        from peft_lowrank_ext.train.models import default_target_modules, resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(args.model))  # no weights, no torch work
        _TARGETS_CACHE[args.model] = default_target_modules(SimpleNamespace(config=config))
    return list(_TARGETS_CACHE[args.model])


def _adalora_ranks(model) -> dict[str, int] | None:
    pattern = model.peft_config[model.active_adapter].rank_pattern
    if not pattern:
        return None
    return {k: int(sum(bool(x) for x in v)) for k, v in pattern.items()}


def _run_autolora(settings: dict[str, Any], data, args, seed: int) -> dict[str, Any]:
    """Search on a held-out split, select ranks, retrain plain LoRA on all the data; both phases timed."""
    from peft_lowrank_ext.cli.recipes import autolora_search_retrain, held_out_batches, train_wrapped_classifier

    tcfg = _training_config(args, settings, seed)

    def train(config, d, name, prepare):
        return train_wrapped_classifier(config, d, tcfg, model=args.model, method=name, prepare=prepare)

    run = autolora_search_retrain(
        build_peft_config("autolora", settings["config"]), data, train, seed=seed,
        batches=lambda tok, held: held_out_batches("classification", tok, held, args.batch_size, args.max_length),
        retrain_alpha=settings["config"]["lora_alpha"], names=("autolora-search", "autolora-retrain"))
    search, retrain, ranks = run.search, run.retrain, run.ranks
    out = _result_fields(retrain)  # accuracy, parameters and adapter are the retrained LoRA's
    out.update({
        "train_time_s": search.train_time_s + retrain.train_time_s,
        "steps": search.steps + retrain.steps,
        "time_per_step_s": (search.train_time_s + retrain.train_time_s) / (search.steps + retrain.steps),
        "median_step_s": retrain.median_step_s,
        "search": {**_result_fields(search), "selected_ranks": ranks,
                   "mean_rank": sum(ranks.values()) / len(ranks), "held_out_rows": run.held_out_rows},
        "retrain": _result_fields(retrain),
        "target_modules": retrain.extra.get("target_modules"),
    })
    return out


# ----- summary --------------------------------------------------------------------------------------
def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: median and spread of accuracy over seeds; medians of the cost numbers."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rows = [r for r in runs if r["method"] == method and "error" not in r]
        errors = [r["error"] for r in runs if r["method"] == method and "error" in r]
        if not rows:
            out[method] = {"n_seeds": 0, "errors": errors}
            continue
        acc = [r["accuracy"] for r in rows]
        q1, q3 = _quartiles(acc)
        peaks = [r["peak_rss_bytes"] for r in rows if r.get("peak_rss_bytes")]
        out[method] = {
            "n_seeds": len(rows), "seeds": [r["seed"] for r in rows],
            "accuracy_median": statistics.median(acc), "accuracy_min": min(acc), "accuracy_max": max(acc),
            "accuracy_q1": q1, "accuracy_q3": q3,
            "trainable_params": statistics.median(r["trainable_params"] for r in rows),
            "adapter_bytes": statistics.median(r["adapter_bytes"] for r in rows),
            "median_step_s": statistics.median(r["median_step_s"] for r in rows),
            "time_per_step_s": statistics.median(r["time_per_step_s"] for r in rows),
            "train_time_s": statistics.median(r["train_time_s"] for r in rows),
            "steps": statistics.median(r["steps"] for r in rows),
            "peak_rss_bytes": max(peaks) if peaks else None,
            "errors": errors,
        }
    return out


# ----- driver ---------------------------------------------------------------------------------------
from peft_lowrank_ext.cli.arg_types import (  # noqa: E402
    nonnegative_int as _nonnegative_int,
    positive_float as _positive_float,
    positive_int as _positive_int,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accuracy, parameters, adapter size, step time and peak memory of "
                                            "every method against PEFT LoRA/AdaLoRA/VeRA and full fine-tuning.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="local model folder (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--dataset", default=None, metavar="NAME", help="a `datasets` data set (default: bundled data)")
    g.add_argument("--subset", default=None, metavar="S", help="its configuration, e.g. sst2 for glue")
    g.add_argument("--train-split", default="train", metavar="SPLIT")
    g.add_argument("--eval-split", default="validation", metavar="SPLIT")
    g.add_argument("--train-file", default=None, metavar="PATH", help="local training file instead")
    g.add_argument("--eval-file", default=None, metavar="PATH", help="local evaluation file")
    g.add_argument("--text-column", default="text", metavar="NAME")
    g.add_argument("--text-pair-column", default=None, metavar="NAME", help="second text of sentence pairs")
    g.add_argument("--label-column", default="label", metavar="NAME")
    g.add_argument("--max-train-samples", type=_positive_int, default=None, metavar="N")
    g.add_argument("--max-eval-samples", type=_positive_int, default=None, metavar="N")
    g.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="default: PEFT's LoRA defaults for the architecture (HeteroLoRA: all attention projections)")
    g = p.add_argument_group("runs")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="M",
                   help=f"any of {', '.join(METHODS)} (default: all)")
    g.add_argument("--seeds", nargs="+", type=_nonnegative_int, default=[0, 1, 2], metavar="S")
    g.add_argument("--epochs", type=_positive_float, default=2.0)
    g.add_argument("--max-steps", type=_positive_int, default=None, metavar="N", help="overrides --epochs (smoke runs)")
    g.add_argument("--batch-size", type=_positive_int, default=None, metavar="N", help="default: the CLI's (16)")
    g.add_argument("--max-length", type=_positive_int, default=None, metavar="N", help="default: the CLI's (64)")
    g.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch CPU threads per worker (default 1: steadier on a shared machine)")
    g.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS",
                   help="stop (and record it) before a run that would end past this many seconds; "
                        "the estimate is the method's median duration so far")
    g.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR, metavar="DIR")
    g.add_argument("--in-process", action="store_true",
                   help="run every method in this process (faster start; peak memory then mixes runs)")
    g.add_argument("--no-render", action="store_true", help="do not write compare.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"argument --seeds: must be distinct, got {args.seeds}")
    return args


def _fill_defaults(args) -> dict[str, Any]:
    defaults = tuned_defaults()
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.max_length = args.max_length or defaults["max_length"]
    return defaults


def worker(args) -> int:
    """Run one method for every seed; print one JSON line per seed (the parent collects them)."""
    import torch

    import peft_lowrank_ext  # noqa: F401 - registers the methods

    torch.set_num_threads(args.threads)
    defaults = _fill_defaults(args)
    data = load_data(args)
    for seed in args.seeds:
        try:
            row = run_one(args.worker, seed, data, args, defaults)
        except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
            import traceback

            traceback.print_exc()
            row = {"method": args.worker, "seed": seed, "error": f"{type(e).__name__}: {e}"}
        print("RESULT " + json.dumps(row, default=str), flush=True)
    return 0


def _payload(args, argv, data, defaults, runs, started, load_start, finished=False) -> dict[str, Any]:
    from peft_lowrank_ext.train.models import resolve_model_path

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    return {
        "schema": SCHEMA,
        "command": exact_command(argv),
        "argv": argv,
        "date_start": started,
        "date_end": now_iso() if finished else None,
        "finished": finished,
        "machine": machine_info(args.threads),
        "load_average": {"start": load_start, "end": load_average()},
        "model": resolve_model_path(args.model),
        "data": {"source": data.source, "train_rows": len(data.train), "eval_rows": len(data.eval),
                 "num_labels": data.num_labels},
        "settings": settings,
        "defaults": defaults,
        "methods": list(args.methods),
        "runs": runs,
        "summary": summarise(runs) if runs else {},
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)

    import peft  # noqa: F401 - imported once here, inherited by every forked run
    import torch
    import transformers  # noqa: F401

    import peft_lowrank_ext  # noqa: F401

    torch.set_num_threads(args.threads)
    started, load_start = now_iso(), load_average()
    try:
        defaults = _fill_defaults(args)
        data = load_data(args)
    except ValueError as e:
        print(f"compare_methods.py: error: {e}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.output_dir / "compare.json"
    runs: list[dict[str, Any]] = []
    stopped: dict[str, Any] = {}

    def save(finished=False):
        payload = _payload(args, argv, data, defaults, runs, started, load_start, finished)
        payload["stopped_early"] = stopped or None
        json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")

    # Seeds outer: if a long run has to be stopped, every method has the same seeds done.
    t_start = time.perf_counter()
    todo = [(seed, method) for seed in args.seeds for method in args.methods]
    for i, (seed, method) in enumerate(todo):
        if args.time_budget is not None:
            done = [r["wall_s"] for r in runs if r["method"] == method and "wall_s" in r]
            estimate = statistics.median(done) if done else 0.0
            if time.perf_counter() - t_start + estimate > args.time_budget:
                stopped["reason"] = (f"--time-budget {args.time_budget:g} s: {method} seed {seed} (about "
                                     f"{estimate:.0f} s) would not finish in time")
                stopped["not_run"] = [{"method": m, "seed": sd} for sd, m in todo[i:]]
                print(f"[compare] stopping early: {stopped['reason']}", file=sys.stderr, flush=True)
                break
        print(f"[compare] {method} seed {seed} (load {load_average()})", file=sys.stderr, flush=True)
        if args.in_process:
            runs.append(run_one(method, seed, data, args, defaults))
        elif hasattr(os, "fork"):
            runs.append(run_forked(method, seed, args, defaults))
        else:  # no fork (Windows): a fresh interpreter per method
            runs.append(_run_spawned(argv, method, seed))
        _report(runs[-1])
        save()
    save(finished=True)
    if not args.no_render:
        md = load_renderer().render_compare(json.loads(json_path.read_text(encoding="utf-8")))
        (args.output_dir / "compare.md").write_text(md, encoding="utf-8")
        print(md)
    print(f"wrote {json_path}", file=sys.stderr)
    return 0 if all("error" not in r for r in runs) else 1


def _child(method: str, seed: int, args, defaults: dict[str, Any], conn) -> None:
    try:
        import torch

        torch.set_num_threads(args.threads)
        row = run_one(method, seed, load_data(args), args, defaults)
    except BaseException as e:  # noqa: BLE001 - report any failure to the parent
        import traceback

        traceback.print_exc()
        row = {"method": method, "seed": seed, "error": f"{type(e).__name__}: {e}"}
    conn.send(json.dumps(row, default=str))
    conn.close()


def _run_spawned(argv: list[str], method: str, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method, "--seeds", str(seed)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    return {"method": method, "seed": seed, "error": f"worker exited with {proc.returncode} and no result"}


def run_forked(method: str, seed: int, args, defaults: dict[str, Any]) -> dict[str, Any]:
    """One (method, seed) in a forked child: its peak memory is its own, imports are paid once.

    The parent has imported the libraries but run no torch computation (no thread pools to
    inherit); the child loads data and model itself.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(method, seed, args, defaults, child_conn))
    proc.start()
    child_conn.close()
    try:
        text = parent_conn.recv()
    except EOFError:
        text = None
    proc.join()
    if text is None:
        return {"method": method, "seed": seed, "error": f"worker exited with {proc.exitcode} and no result"}
    return json.loads(text)


def load_renderer():
    """bench/render_results.py (the Markdown of compare.json)."""
    from bench import render_results

    return render_results


def _report(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"[compare]   seed {row['seed']}: FAILED {row['error']}", file=sys.stderr, flush=True)
    else:
        print(f"[compare]   seed {row['seed']}: accuracy {row['accuracy']:.4f}, {row['trainable_params']:,} "
              f"trainable, step {1000 * row['median_step_s']:.0f} ms, {row['train_time_s']:.0f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
