"""The five methods of the command line: their default hyper-parameters, configs and training recipes.

Every method gets the same ``r``, ``lora_alpha`` and target modules; what differs is collected in
:data:`METHOD_DEFAULTS` (the one place to change a method's defaults). Training runs through the
shared plain loop (classification, :mod:`peft_lowrank_ext.train.loop`) or TRL's ``SFTTrainer``
(causal LM, :mod:`peft_lowrank_ext.train.sft`); the methods' own training-time work happens by itself
through the optimizer step hooks. AutoLoRA is two runs: the search on a held-out split of the
training data, then plain LoRA retrained on all of it with the ranks found
(:func:`autolora_search_retrain`, which the benchmarks use too with their own train function).

This module is also the one table of the methods: :data:`CONFIG_CLASSES` (method -> config class;
the CLI's choices), :func:`peft_config` (one config from settings, used by bench/ and examples/),
and the choice lists of the method options, taken from the configs (``HYPERGRADIENTS``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from peft import LoraConfig

from peft_lowrank_ext.tuners.autolora.config import HYPERGRADIENTS, AutoLoraConfig
from peft_lowrank_ext.tuners.heterolora.config import MODES as HETERO_MODES
from peft_lowrank_ext.tuners.heterolora.config import PROXIES as HETERO_PROXIES
from peft_lowrank_ext.tuners.heterolora.config import HeteroLoraConfig
from peft_lowrank_ext.tuners.prilora.config import PriLoraConfig
from peft_lowrank_ext.tuners.rlora.config import RLoraConfig

#: method name -> its PEFT config class: the one table of the methods (the CLI's choices are its keys)
CONFIG_CLASSES: dict[str, type] = {"lora": LoraConfig, "rlora": RLoraConfig, "autolora": AutoLoraConfig,
                                   "prilora": PriLoraConfig, "heterolora": HeteroLoraConfig}
METHODS = tuple(CONFIG_CLASSES)
TASKS = ("auto", "classification", "regression", "causal-lm")  # auto: regression iff a label is a non-integer number
DYNAMIC_RANK_METHODS = ("prilora", "heterolora")  # recorded during training: HeteroLoRA ranks, PRILoRA sparsity
SPARSITY_METHODS = ("prilora",)  # prunes entries of A, not ranks: sparsity_history_*.png instead of rank_history
RANKED_METHODS = ("autolora", "prilora", "heterolora")  # per-module ranks differ (ranks_*.png)

# ---- every method's defaults, in one place ---------------------------------------------------------------
# Measured on the bundled data with the packaged MiniLM (3 epochs, batch 16, r = 8 on query/value, one seed,
# 200 evaluation rows, so one row = 0.5 points):
# * LoRA: lr 1e-3 -> 89.0%, 2e-3 -> 92.5%.
# * RLoRA (head at 2e-3, no PAC-Bayes): lr 1e-2 -> 84.5%, 3e-2 -> 87.5%. The McAllester bound at weight 1.0
#   (n = 800) outweighs the task loss and keeps z near 0 (55%); weight 0.1 -> 86.5%, 0.01 -> 88.5%.
# * AutoLoRA: β's Adam lr 1e-2 (bench/autolora.py; the authors' 3e-4 barely moves β in 100 steps, so every
#   α stays near 1/r and thresholding keeps an arbitrary half); first-order search + retrain at lr 1e-3 ->
#   85.0%, second order -> 85.5% (bench/autolora.json). On SST-2 (bench/real_tasks.py, 3 seeds) first order
#   matched the authors' darts_real_step (79.6% vs 78.6% median) at about a quarter of its search cost: the default.
# * PRILoRA (ranks 4 -> 12, mean 8): lr 2e-3, pruning every 10 of 150 steps to 50% -> 93.5% (bench/prilora.py).
#   The schedule scales with the run: prune every ~1/15 of the steps, full sparsity at 2/3 of them.
# * HeteroLoRA: lr 2e-3, grad_norm proxy -> 90.0% static / 89.5% dynamic at budget 0.25 of 24 candidates
#   (bench/heterolora.py). Here the candidates are the same query/value modules as LoRA's, so budget 0.5 keeps
#   half of them; dynamic mode (re-allocation every 10% of an epoch, the authors' choice) so that the ranks
#   change during training; 2 scoring batches per allocation (each costs one extra forward/backward).
# With these defaults the default run (`python -m peft_lowrank_ext --threads 1`, 2026-11-23, loaded machine) gave:
# LoRA 92.0%, RLoRA 86.5%, AutoLoRA 92.0% (ranks 2-4, mean 2.83; search model 79.5%), PRILoRA 93.0%,
# HeteroLoRA 87.0% (6 of 12 modules on). Tried for HeteroLoRA afterwards: lr 5e-3 -> 88.5%, static mode -> 89.5%
# (within noise: one row = 0.5 points; dynamic stays the default so that the rank history shows re-allocation).
DEFAULT_R = 8
DEFAULT_LR = 2e-3  # LoRA-style adapters and every classification head
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"lr": DEFAULT_LR},
    "rlora": {"lr": 3e-2, "projection_ratio": 0.05, "pac_bayes_weight": 0.1},
    "autolora": {"lr": DEFAULT_LR, "hypergradient": "first_order", "arch_lr": 1e-2, "held_out_fraction": 0.3},
    "prilora": {"lr": DEFAULT_LR, "final_sparsity": 0.5, "prune_every_fraction": 1 / 15, "prune_end_fraction": 2 / 3},
    "heterolora": {"lr": DEFAULT_LR, "budget": 0.5, "proxy": "grad_norm", "mode": "dynamic", "proxy_batches": 2,
                   "realloc_epoch_fraction": 0.1},
}


@dataclass
class MethodRun:
    """One method's finished run: the measured result plus what the figures need."""

    result: Any  # train.run.TrainResult
    ranks: dict[str, int] | None = None
    rank_history: list[tuple[int, dict[str, int]]] | None = None
    sparsity_history: list[tuple[int, dict[str, float]]] | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def method_lr(method: str, args) -> float:
    """The adapter learning rate: ``--rlora-lr`` for RLoRA, else ``--lr`` or the method's default."""
    if method == "rlora":
        return args.rlora_lr if args.rlora_lr is not None else METHOD_DEFAULTS["rlora"]["lr"]
    return args.lr if args.lr is not None else METHOD_DEFAULTS[method]["lr"]


def head_lr(args) -> float:
    return args.lr if args.lr is not None else DEFAULT_LR


def _opt(args, name: str, method: str):
    value = getattr(args, name, None)
    return value if value is not None else METHOD_DEFAULTS[method][name.split("_", 1)[1]]


def total_steps(args, num_train_rows: int) -> int:
    """Optimizer steps of one run (``--max-steps`` or epochs over the training rows)."""
    steps_per_epoch = max(1, math.ceil(num_train_rows / args.batch_size))
    return args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))


def config_class(method: str) -> type:
    """The PEFT config class of ``method``: one of :data:`METHODS`, or PEFT's ``adalora`` / ``vera``
    (baselines of the benchmarks)."""
    if method in CONFIG_CLASSES:
        return CONFIG_CLASSES[method]
    from peft import AdaLoraConfig, VeraConfig

    baselines = {"adalora": AdaLoraConfig, "vera": VeraConfig}
    if method not in baselines:
        raise ValueError(f"argument --method: invalid choice: {method!r} (choose from {', '.join(METHODS)})")
    return baselines[method]


def peft_config(method: str, *, task_type: str = "SEQ_CLS", **settings):
    """A fresh PEFT config of ``method`` (see :func:`config_class`) with ``settings``.

    PRILoRA has no single ``r``: a given ``r`` becomes its mean rank (``r_mean``) unless
    ``r_first``/``r_last`` are set.
    """
    if method == "prilora" and "r" in settings:
        r = settings.pop("r")
        if "r_first" not in settings and "r_last" not in settings:
            settings["r_mean"] = r
    return config_class(method)(task_type=task_type, **settings)


def make_peft_config(method: str, args, num_train_examples: int):
    """A fresh PEFT config for ``method`` with the shared r / alpha / targets and the method's defaults."""
    if method not in CONFIG_CLASSES:
        raise ValueError(f"argument --method: invalid choice: {method!r} (choose from {', '.join(METHODS)})")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.r
    targets = list(args.target_modules) if args.target_modules else None
    task_type = "CAUSAL_LM" if getattr(args, "task", "classification") == "causal-lm" else "SEQ_CLS"
    common = {"r": args.r, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "task_type": task_type}
    steps = total_steps(args, num_train_examples)
    if method == "lora":
        return peft_config(method, **common)
    if method == "rlora":
        if args.intrinsic_dim is not None and args.projection_ratio is not None:
            raise ValueError("argument --intrinsic-dim: not allowed with argument --projection-ratio (give one of them)")
        size = ({"intrinsic_dim": args.intrinsic_dim} if args.intrinsic_dim is not None
                else {"projection_ratio": args.projection_ratio or METHOD_DEFAULTS["rlora"]["projection_ratio"]})
        weight = args.pac_bayes_weight if args.pac_bayes_weight is not None else METHOD_DEFAULTS["rlora"]["pac_bayes_weight"]
        pac = ({"pac_bayes_weight": weight, "num_train_examples": num_train_examples} if weight > 0
               else {"pac_bayes_weight": 0.0})
        return peft_config(method, seed=args.seed, **common, **size, **pac)
    if method == "autolora":
        d = METHOD_DEFAULTS["autolora"]
        return peft_config(method, **common, hypergradient=_opt(args, "autolora_hypergradient", method),
                           arch_lr=_opt(args, "autolora_arch_lr", method), held_out_fraction=d["held_out_fraction"])
    if method == "prilora":
        d = METHOD_DEFAULTS["prilora"]
        return peft_config(method, **common, final_sparsity=_opt(args, "prilora_final_sparsity", method),
                           total_steps=steps, prune_every_fraction=d["prune_every_fraction"],
                           prune_end_fraction=d["prune_end_fraction"])
    d = METHOD_DEFAULTS["heterolora"]
    steps_per_epoch = max(1, math.ceil(num_train_examples / args.batch_size))
    return peft_config(method, **common, seed=args.seed, budget=_opt(args, "heterolora_budget", method),
                       proxy=_opt(args, "heterolora_proxy", method), mode=_opt(args, "heterolora_mode", method),
                       proxy_batches=max(1, min(d["proxy_batches"], steps // 4)),
                       realloc_every=max(1, math.ceil(d["realloc_epoch_fraction"] * steps_per_epoch)),
                       steps_per_epoch=steps_per_epoch)


def training_config(method: str, args):
    from peft_lowrank_ext.train.run import TrainingConfig

    return TrainingConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                          lr=method_lr(method, args), head_lr=head_lr(args), max_length=args.max_length,
                          seed=args.seed, progress=not args.no_progress)


# ---- one training run, either task --------------------------------------------------------------------
Prepare = Callable[[Any, Any], None]  # (peft_model, tokenizer) -> None, before the first step


#: ``train(peft_config, data, name, prepare) -> TrainResult``: one run of a config on a data set
Train = Callable[[Any, Any, str, "Prepare | None"], Any]


def _train_once(config, data, tcfg, args, output_dir: Path | None, name: str, prepare: Prepare | None = None):
    if args.task == "causal-lm":
        from peft_lowrank_ext.train.sft import train_causal_lm

        return train_causal_lm(config, data, tcfg, model=args.model, output_dir=output_dir, method=name,
                               prepare=prepare)
    return train_wrapped_classifier(config, data, tcfg, model=args.model, output_dir=output_dir, method=name,
                                    prepare=prepare)


def train_wrapped_classifier(config, data, tcfg, *, model=None, output_dir: Path | None = None, method: str,
                             prepare: Prepare | None = None):
    """:func:`~peft_lowrank_ext.train.loop.train_classifier` with a ``prepare(peft_model, tokenizer)``
    step between wrapping and training."""
    from peft_lowrank_ext.train.loop import fit
    from peft_lowrank_ext.train.models import wrap_classifier

    peft_model, tokenizer = wrap_classifier(config, model, data.num_labels, tcfg.seed)
    if prepare is not None:
        prepare(peft_model, tokenizer)
    return fit(peft_model, tokenizer, data, tcfg, method=method, output_dir=output_dir)


def held_out_batches(task: str, tokenizer, held_out, batch_size: int, max_length: int) -> list[dict]:
    """AutoLoRA's held-out split as ready batches with labels, for either task."""
    from peft_lowrank_ext.train.data import classification_batches, lm_batches

    if task == "causal-lm":
        return lm_batches(tokenizer, list(held_out["text"]), batch_size, max_length)
    return classification_batches(tokenizer, held_out, batch_size, max_length)


@dataclass
class AutoLoraRun:
    """Both phases of an AutoLoRA run and what the search selected."""

    search: Any  # TrainResult of the search (its peft_model is dropped once the retrain config is read)
    retrain: Any  # TrainResult of plain LoRA retrained with the selected ranks
    ranks: dict[str, int]  # autolora_select: {module: rank kept}
    selected: dict[str, int]  # module_ranks of the search model after selection (for the figures)
    search_rows: int
    held_out_rows: int


def autolora_search_retrain(search_config, data, train: Train, batches: Callable[[Any, Any], list[dict]], *,
                            seed: int, retrain_alpha: float | None = None,
                            names: tuple[str, str] = ("autolora-search", "autolora"),
                            retrain_overrides: dict[str, Any] | None = None,
                            search_trains_head: bool = False) -> AutoLoraRun:
    """AutoLoRA's pipeline: search on ``1 - held_out_fraction`` of ``data.train`` (β learnt on the rest,
    ``batches(tokenizer, held_out_split)``), threshold, retrain plain LoRA on all of it.

    ``train(config, data, name, prepare)`` runs one phase (the CLI's loop or SFT, a benchmark's
    settings); ``retrain_alpha`` is the retrained LoRA's ``lora_alpha`` (default: the search's);
    ``retrain_overrides`` are further ``LoraConfig`` fields of the retrain (e.g. ``lora_dropout``).
    As in the authors' search, only the adapter trains in the search (the head stays as initialised)
    unless ``search_trains_head``.
    """
    import dataclasses

    from peft_lowrank_ext import AutoLoraSearch, autolora_select, retrain_lora_config
    from peft_lowrank_ext.train.ranks import module_ranks
    from peft_lowrank_ext.tuners.autolora.selection import freeze_modules_to_save

    if len(data.train) < 2:
        raise ValueError("autolora: the training data needs at least 2 rows (a search and a held-out part)")
    split = data.train.train_test_split(test_size=search_config.held_out_fraction, seed=seed)

    def attach(peft_model, tokenizer):
        AutoLoraSearch(batches(tokenizer, split["test"])).attach(peft_model)
        if not search_trains_head:
            freeze_modules_to_save(peft_model)

    search = train(search_config, dataclasses.replace(data, train=split["train"]), names[0], attach)
    ranks = autolora_select(search.peft_model)
    selected = module_ranks(search.peft_model)
    if search.adapter_dir:  # saved again in the selected phase: inspect/export then show the kept ranks
        search.peft_model.save_pretrained(search.adapter_dir)
    kwargs = {} if retrain_alpha is None else {"lora_alpha": retrain_alpha}
    kwargs.update(retrain_overrides or {})
    retrain_config = retrain_lora_config(search.peft_model, **kwargs)
    del search.peft_model
    retrain = train(retrain_config, data, names[1], None)
    return AutoLoraRun(search=search, retrain=retrain, ranks=ranks, selected=selected,
                       search_rows=len(split["train"]), held_out_rows=len(split["test"]))


def run_autolora_pipeline(args, data, output_dir: Path | None) -> MethodRun:
    """The CLI's AutoLoRA: :func:`autolora_search_retrain` with the CLI's settings, either task."""
    search_config = make_peft_config("autolora", args, len(data.train))
    tcfg = training_config("autolora", args)

    def train(config, d, name, prepare):
        out = output_dir if name == "autolora" else (output_dir / "search" if output_dir else None)
        return _train_once(config, d, tcfg, args, out, name, prepare)

    run = autolora_search_retrain(
        search_config, data, train, seed=args.seed,
        batches=lambda tok, held: held_out_batches(args.task, tok, held, args.batch_size, args.max_length))
    search, result, ranks = run.search, run.retrain, run.ranks
    result.extra["search"] = {
        "hypergradient": search_config.hypergradient, "arch_lr": search_config.arch_lr,
        "train_rows": run.search_rows, "held_out_rows": run.held_out_rows, "steps": search.steps,
        "train_time_s": search.train_time_s, "time_per_step_s": search.time_per_step_s,
        "median_step_s": search.median_step_s, "accuracy": search.accuracy, "eval_loss": search.eval_loss,
        "pearson": getattr(search, "pearson", None),
        "peak_rss_bytes": search.peak_rss_bytes, "adapter_dir": search.adapter_dir,
    }
    result.extra["ranks"] = ranks
    result.extra["mean_rank"] = sum(ranks.values()) / len(ranks)
    return MethodRun(result=result, ranks=run.selected,
                     curves={"autolora (search)": search.loss_curve, "autolora (retrain)": result.loss_curve})


def attach_heterolora_data(peft_model, tokenizer, data, args) -> None:
    """HeteroLoRA's scoring data as the authors take it: the first training rows, unshuffled (the same
    batches at every allocation), and for the alpha test the evaluation split (which then informs
    the allocation, as in the authors' 1:1 training/validation mix)."""
    from peft_lowrank_ext import HeteroLoraData

    config = next(iter(peft_model.peft_config.values()))
    rows = min(len(data.train), config.proxy_batches * args.batch_size)
    train = held_out_batches(args.task, tokenizer, data.train.select(range(rows)), args.batch_size, args.max_length)
    validation = (held_out_batches(args.task, tokenizer, data.eval, args.batch_size, args.max_length)
                  if config.proxy == "alpha_test" else None)
    HeteroLoraData(train=train, validation=validation).attach(peft_model)


def run_method(method: str, args, data, output_dir: Path | None) -> MethodRun:
    """Train ``method`` on ``data`` with the CLI's settings; ranks and their history for the figures."""
    if method == "autolora":
        return run_autolora_pipeline(args, data, output_dir)
    from peft_lowrank_ext.train.ranks import RankHistory, module_ranks

    history: list = []

    def record(peft_model, tokenizer):
        if method == "heterolora":
            attach_heterolora_data(peft_model, tokenizer, data, args)
        if method in DYNAMIC_RANK_METHODS:
            tracker = RankHistory(peft_model, every=1, metric="sparsity" if method in SPARSITY_METHODS else "rank")
            tracker.record(0)
            history.append(tracker.attach())

    result = _train_once(make_peft_config(method, args, len(data.train)), data, training_config(method, args),
                         args, output_dir, method, prepare=record)
    for tracker in history:
        tracker.detach()
    ranks = module_ranks(result.peft_model) if method in RANKED_METHODS else None
    if ranks is not None:
        result.extra["ranks"] = ranks
    snapshots = history[0].snapshots if history else None
    sparse = method in SPARSITY_METHODS
    return MethodRun(result=result, ranks=ranks, rank_history=None if sparse else snapshots,
                     sparsity_history=snapshots if sparse else None,
                     curves={method: result.loss_curve})


__all__ = ["AutoLoraRun", "CONFIG_CLASSES", "DEFAULT_LR", "DEFAULT_R", "HETERO_MODES", "HETERO_PROXIES",
           "HYPERGRADIENTS", "METHODS", "METHOD_DEFAULTS", "MethodRun", "TASKS", "autolora_search_retrain",
           "config_class", "held_out_batches", "make_peft_config", "method_lr", "peft_config", "run_method",
           "train_wrapped_classifier"]
