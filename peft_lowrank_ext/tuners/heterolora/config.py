"""Configuration of HeteroLoRA (Zhang, Zhang, Gao, Mullins, Constantinides, Zhao, arXiv:2406.14956, 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.utils import PeftType

from .._base.checks import MAX_CONFIG_RANK, MAX_INT, _fail, _is_int, _is_real, check_choice, check_int, check_real
from .._base.config import LowRankPeftConfig

SHORTCUT_KINDS = ("residual_1", "residual_2", "shortcut_sa", "shortcut_ffn")
PROXIES = ("constant", "grad_norm", "weight_grad_norm", "snip", "synflow", "synflow_logits", "alpha_test",
           "alpha_test_delta")
ZERO_AT_INIT = ("snip", "synflow", "synflow_logits", "alpha_test_delta")  # exactly 0 for every candidate at B = 0
MODES = ("static", "dynamic")
TIMINGS = ("authors", "window")
ALPHA_TEST_METRICS = ("accuracy", "perplexity")
RANKINGS = ("combined", "separated")
ZERO_SCORE_FALLBACKS = ("tie_break", "grad_norm")
MAX_HISTORY = 2**16  # three int64/fp32 buffers of this length per candidate module


@dataclass
class HeteroLoraConfig(LowRankPeftConfig):
    """HeteroLoRA: a zero-cost proxy picks which candidate low-rank modules are switched on.

    Zhang, Zhang, Gao, Mullins, Constantinides, Zhao. *Unlocking the Global Synergies in Low-Rank
    Adapters.* arXiv:2406.14956 (2024).

    Candidates are the LoRA modules on ``target_modules`` (rank ``r``, scaling ``lora_alpha / r``)
    and, optionally, LoRA-adapted shortcuts (``shortcuts``; rank ``shortcut_r``, scaling
    ``shortcut_alpha / shortcut_r``). Exactly ``k = max(1, ⌊budget · n + ½⌋)`` of the ``n``
    candidates are switched on (nearest integer, halves round up; with ``ranking="separated"`` the
    rule is applied to LoRA modules and shortcuts separately). The others keep their weights but
    get no gradient, have no effect and cost no compute.

    Timing (``timing``): ``"authors"`` (default) allocates *before* the training step whose index
    within its epoch is a multiple of ``realloc_every`` — step 0 always, and with ``mode="dynamic"``
    again every ``realloc_every`` steps and at the start of every epoch — scoring the first
    ``proxy_batches`` batches of the unshuffled training data given by :class:`HeteroLoraData`
    (the authors' choice) or, without it, the batch about to be trained; no training step is spent
    on scoring. ``"window"`` (ours, the earlier default) spends the first ``proxy_batches``
    optimizer steps as a scoring window — every candidate on, the proxy taken from the steps' own
    gradients, adapter gradients dropped — so those steps train only ``modules_to_save`` (e.g. the
    classifier head) while the learning-rate schedule advances; re-allocations then score the last
    ``min(proxy_batches, realloc_every)`` training batches in extra passes.

    The default proxy ``grad_norm`` is the authors' main one. At the usual initialisation ``B = 0``
    SNIP, SynFlow and ``alpha_test_delta`` are exactly zero for every candidate. Such an allocation is then the
    seeded random tie-break, as in the authors' code (``zero_score_fallback="tie_break"``, the
    default), or, opt-in, uses the gradient norm instead (``zero_score_fallback="grad_norm"``); the
    history records either case (``all_zero`` / ``fallback``; see ``heterolora/proxies.py``).
    """

    r: int = field(default=8, metadata={"help": "Rank of every LoRA module candidate."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scaling numerator of LoRA modules: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    shortcut_r: int = field(default=8, metadata={"help": "Rank of every shortcut candidate's LoRA."})
    shortcut_alpha: float = field(
        default=4.0, metadata={"help": "Scaling numerator of shortcuts: s = shortcut_alpha / shortcut_r."}
    )
    shortcuts: Optional[list[str]] = field(
        default=None,
        metadata={"help": "LoRA-adapted shortcuts added to every transformer block, any of 'residual_1', "
                          "'residual_2', 'shortcut_sa', 'shortcut_ffn' (None or []: none)."},
    )
    budget: float = field(default=0.25, metadata={"help": "Fraction of candidates switched on, in (0, 1]."})
    proxy: str = field(
        default="grad_norm",
        metadata={"help": "Zero-cost proxy. The authors' definitions: 'constant', 'grad_norm' (‖∇A‖+‖∇B‖), 'snip', "
                          "'synflow' (loss with labels from all-ones input embeddings), 'alpha_test' (smallest "
                          "scale of the whole layer output — of ΔS for shortcuts — keeping the task metric on a "
                          "1:1 train/validation mix; needs HeteroLoraData(validation=...)). Ours: "
                          "'weight_grad_norm' (‖∇_W L‖ at the candidate's position, independent of its own A and "
                          "B), 'synflow_logits' (sum of logits, no labels, eval mode), 'alpha_test_delta' (scale ΔW "
                          "only, judged by the training loss)."},
    )
    proxy_batches: int = field(
        default=32,
        metadata={"help": "Batches scored per allocation, >= 1 (alpha_test: batches of the train/validation mix). "
                          "timing='window': optimizer steps of the scoring window (with gradient accumulation "
                          "each contributes its accumulated gradient)."},
    )
    mode: str = field(default="static", metadata={"help": "'static' (allocate once) or 'dynamic' (re-allocate)."})
    timing: str = field(
        default="authors",
        metadata={"help": "'authors': allocate before the training step, at step 0 and (dynamic) whenever the step "
                          "index within the epoch is a multiple of realloc_every — no step is spent scoring. "
                          "'window' (ours): the first proxy_batches optimizer steps are a scoring window in which "
                          "adapter gradients are dropped while the head and the LR schedule advance."},
    )
    realloc_every: Union[int, float] = field(
        default=0.1,
        metadata={"help": "Dynamic mode: an integer >= 1 is optimizer steps between re-allocations; a float in "
                          "(0, 1] is a fraction of an epoch, ceil(fraction · steps_per_epoch) steps (the authors: "
                          "0.1 by default, 0.2 in most configs)."},
    )
    steps_per_epoch: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps per epoch, >= 1: needed by a fractional realloc_every and to restart the "
                          "schedule at every epoch. Set by HeteroLoraData under Trainer/SFTTrainer; give it in a "
                          "plain loop (None: unknown — an integer realloc_every then counts steps from 0)."},
    )
    alpha_test_metric: Optional[str] = field(
        default=None,
        metadata={"help": "proxy='alpha_test': 'accuracy' (argmax of logits vs labels) or 'perplexity' (exp of the "
                          "mean batch loss); None: perplexity for task_type CAUSAL_LM, else accuracy."},
    )
    ranking: str = field(
        default="combined",
        metadata={"help": "'combined' (shortcuts compete with LoRA modules for one budget) or 'separated' "
                          "(each kind of candidate gets the budget fraction of its own)."},
    )
    alpha_test_tolerance: float = field(
        default=0.01,
        metadata={"help": "alpha_test: allowed metric change (accuracy: m·(1-tol); perplexity, as the authors: "
                          "m + tol/m); alpha_test_delta: relative loss increase allowed; > 0."},
    )
    zero_score_fallback: str = field(
        default="tie_break",
        metadata={"help": "When every snip/synflow/alpha_test score of an allocation is exactly zero (B = 0 at "
                          "initialisation): 'tie_break' (the seeded random tie-break, as in the authors' code) or "
                          "'grad_norm' (rank by the gradient norm instead; warns and marks 'fallback' in the "
                          "history)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random tie-break (and of the 'constant' proxy)."})
    history_size: int = field(
        default=64, metadata={"help": "Allocations kept in the saved history (a ring buffer), >= 1."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.HETEROLORA
        owner = type(self).__name__
        self._check_lora_fields(owner)
        check_int(owner, "r", self.r, minimum=1, cap=MAX_CONFIG_RANK)
        check_int(owner, "shortcut_r", self.shortcut_r, minimum=1, cap=MAX_CONFIG_RANK)
        check_real(owner, "shortcut_alpha", self.shortcut_alpha, low=0.0, low_open=True)
        self.shortcuts = _check_shortcuts(owner, self.shortcuts)
        check_real(owner, "budget", self.budget, low=0.0, high=1.0, low_open=True)
        check_choice(owner, "proxy", self.proxy, PROXIES)
        check_int(owner, "proxy_batches", self.proxy_batches, minimum=1)
        check_choice(owner, "mode", self.mode, MODES)
        check_choice(owner, "timing", self.timing, TIMINGS)
        _check_realloc_every(owner, self.realloc_every)
        if self.steps_per_epoch is not None:
            check_int(owner, "steps_per_epoch", self.steps_per_epoch, minimum=1)
        if self.alpha_test_metric is None:
            task = getattr(self.task_type, "value", self.task_type)
            self.alpha_test_metric = "perplexity" if task == "CAUSAL_LM" else "accuracy"
        check_choice(owner, "alpha_test_metric", self.alpha_test_metric, ALPHA_TEST_METRICS)
        if self.proxy == "alpha_test" and self.timing == "window":
            raise ValueError(f"{owner}.timing='window' is not allowed with proxy='alpha_test'; the authors' alpha "
                             "test scores held-out data at allocation time: use timing='authors' or "
                             "proxy='alpha_test_delta'.")
        check_choice(owner, "ranking", self.ranking, RANKINGS)
        check_real(owner, "alpha_test_tolerance", self.alpha_test_tolerance, low=0.0, low_open=True)
        check_choice(owner, "zero_score_fallback", self.zero_score_fallback, ZERO_SCORE_FALLBACKS)
        check_int(owner, "seed", self.seed, minimum=0)
        check_int(owner, "history_size", self.history_size, minimum=1, cap=MAX_HISTORY)


def _check_realloc_every(owner: str, value) -> None:
    if _is_int(value):
        check_int(owner, "realloc_every", value, minimum=1)
    elif not (_is_real(value) and 0.0 < value <= 1.0):
        _fail(owner, "realloc_every", value, "an integer >= 1 (steps) or a float in (0, 1] (fraction of an epoch)")


def realloc_steps(config) -> int:
    """Steps between re-allocations; a fraction of an epoch needs ``steps_per_epoch``."""
    every = config.realloc_every
    if _is_int(every):
        return every
    if config.steps_per_epoch is None:
        raise ValueError(f"HeteroLoraConfig.realloc_every={every!r} is a fraction of an epoch, which needs "
                         "steps_per_epoch: set HeteroLoraConfig(steps_per_epoch=...) or pass HeteroLoraData "
                         "(callbacks=[HeteroLoraData(...)] or HeteroLoraData(...).attach(model)); or give an "
                         "integer number of steps.")
    return max(1, min(MAX_INT, math.ceil(every * config.steps_per_epoch)))


def _check_shortcuts(owner: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
        raise ValueError(f"{owner}.shortcuts={value!r} is not allowed; shortcuts must be None or a list of "
                         f"{', '.join(repr(k) for k in SHORTCUT_KINDS)}.")
    kinds = list(value)
    for kind in kinds:
        if kind not in SHORTCUT_KINDS:
            raise ValueError(f"{owner}.shortcuts={value!r} is not allowed; {kind!r} is not one of "
                             f"{', '.join(repr(k) for k in SHORTCUT_KINDS)}.")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"{owner}.shortcuts={value!r} is not allowed; each shortcut kind may appear once.")
    return [k for k in SHORTCUT_KINDS if k in kinds]  # canonical order: saved configs compare equal


def budget_count(budget: float, n: int) -> int:
    """Modules switched on out of ``n``: the nearest integer to ``budget · n`` (halves up), at least 1."""
    if n <= 0:
        return 0
    return max(1, min(n, math.floor(budget * n + 0.5 + 1e-9)))
