"""Configuration of HeteroLoRA (Zhang, Zhang, Gao, Mullins, Constantinides, Zhao, arXiv:2406.14956, 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from peft.utils import PeftType

from .._base.checks import MAX_CONFIG_RANK, check_choice, check_int, check_real
from .._base.config import LowRankPeftConfig

SHORTCUT_KINDS = ("residual_1", "residual_2", "shortcut_sa", "shortcut_ffn")
PROXIES = ("constant", "grad_norm", "snip", "synflow", "alpha_test")
MODES = ("static", "dynamic")
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

    Allocation needs no extra code in a plain loop, ``Trainer`` or ``SFTTrainer``: the first
    ``proxy_batches`` optimizer steps are a scoring window — every candidate is on, the proxy is
    accumulated from the training batches, and no adapter weight moves (the classifier head of
    ``modules_to_save`` still trains) — after which the top ``k`` are switched on. Call
    :func:`heterolora_score` before training to score on batches of your choice instead (then no
    training step is spent on scoring). ``mode="dynamic"`` re-scores every ``realloc_every`` steps
    with every candidate switched on, on the last ``min(proxy_batches, realloc_every)`` training
    batches, each scored by one extra forward/backward pass.

    The default proxy ``grad_norm`` is our choice: at the usual initialisation ``B = 0`` SNIP,
    SynFlow and the alpha test are exactly zero for every candidate. Such an allocation is then the
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
        metadata={"help": "Zero-cost proxy: 'constant', 'grad_norm', 'snip', 'synflow' or 'alpha_test'."},
    )
    proxy_batches: int = field(
        default=32,
        metadata={"help": "Training batches scored per allocation, >= 1. Inside training they are optimizer steps: "
                          "with gradient accumulation each contributes its accumulated gradient."},
    )
    mode: str = field(default="static", metadata={"help": "'static' (allocate once) or 'dynamic' (re-allocate)."})
    realloc_every: int = field(
        default=100,
        metadata={"help": "Dynamic mode: optimizer steps between re-allocations, >= 1. The authors use 10% of an "
                          "epoch; the default 100 is that for 1,000 steps per epoch — set "
                          "ceil(0.1 * steps_per_epoch) for your data."},
    )
    ranking: str = field(
        default="combined",
        metadata={"help": "'combined' (shortcuts compete with LoRA modules for one budget) or 'separated' "
                          "(each kind of candidate gets the budget fraction of its own)."},
    )
    alpha_test_tolerance: float = field(
        default=0.01,
        metadata={"help": "alpha_test: relative loss increase allowed when scaling a module's output down, > 0."},
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
        check_int(owner, "realloc_every", self.realloc_every, minimum=1)
        check_choice(owner, "ranking", self.ranking, RANKINGS)
        check_real(owner, "alpha_test_tolerance", self.alpha_test_tolerance, low=0.0, low_open=True)
        check_choice(owner, "zero_score_fallback", self.zero_score_fallback, ZERO_SCORE_FALLBACKS)
        check_int(owner, "seed", self.seed, minimum=0)
        check_int(owner, "history_size", self.history_size, minimum=1, cap=MAX_HISTORY)


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
