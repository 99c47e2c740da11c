"""Configuration of AutoLoRA (Zhang, Qiang, Somayajula, Xie, NAACL 2024)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

from peft.utils import PeftType

from .._base.checks import MAX_CONFIG_RANK, check_choice, check_int, check_real
from .._base.config import LowRankPeftConfig

#: β's hypergradient, each named for what it computes (see ``search.py``):
#: ``darts_real_step`` (betty's "darts", the authors' search), ``darts_virtual_sgd`` (DARTS' paper form),
#: ``first_order`` (the held-out gradient at the current weights).
HYPERGRADIENTS = ("darts_real_step", "darts_virtual_sgd", "first_order")
#: older names, still read from saved configs
LEGACY_HYPERGRADIENTS = {"second_order": "darts_virtual_sgd"}
PHASES = ("search", "selected")
SELECTION_RULES = ("softmax", "normalized")


@dataclass
class AutoLoraConfig(LowRankPeftConfig):
    """AutoLoRA search phase: ``ΔW = s · B · diag(α) · A`` with ``α = softmax(β)`` per module.

    A and B train on the training data with the user's optimizer; β trains on held-out data by
    bi-level (meta) learning every ``search_every`` optimizer steps (see ``AutoLoraSearch``). Thresholding α
    gives per-module ranks (``autolora_select``), which a fresh LoRA is retrained with
    (``retrain_lora_config`` / ``run_autolora``).
    """

    r: int = field(default=8, metadata={"help": "Search rank: number of rank-1 components per module."})
    lora_alpha: float = field(
        default=16.0, metadata={"help": "Scaling numerator: s = lora_alpha / r (fixed; the authors' 16)."}
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input in the search, in [0, 1)."})
    retrain_dropout: float = field(
        default=0.1, metadata={"help": "lora_dropout of the retrained LoRA (retrain_lora_config), in [0, 1); the authors' 0.1."}
    )
    threshold: Optional[float] = field(
        default=None, metadata={"help": "Keep component j if its score ≥ threshold, in (0, 1]; None means 1/r."}
    )
    selection_rule: str = field(
        default="softmax",
        metadata={"help": "Score thresholded at selection: 'softmax' (softmax(β)_j, the authors' lora_glue.py) or "
                          "'normalized' (β_j / Σβ on raw β initialised to ones, the authors' run_glue_search.py)."},
    )
    hypergradient: str = field(
        default="first_order",
        metadata={"help": "'first_order' (the held-out gradient only; the default, chosen by measurement, see "
                          "docs/methods/autolora.md), 'darts_real_step' (the authors' betty 'darts': a real optimizer "
                          "step, then the held-out gradient plus a finite-difference implicit term, no ξ) or "
                          "'darts_virtual_sgd' (DARTS' virtual SGD step of size ξ, implicit term × ξ)."},
    )
    search_every: int = field(
        default=1,
        metadata={"help": "β takes its step every this many optimizer steps (1: every step, as the authors), >= 1; "
                          "k > 1 divides the search's extra cost by k."},
    )
    arch_lr: float = field(default=3e-4, metadata={"help": "Adam learning rate for β."})
    arch_beta1: float = field(default=0.5, metadata={"help": "Adam β1 for β (authors: 0.5)."})
    arch_beta2: float = field(default=0.999, metadata={"help": "Adam β2 for β."})
    arch_eps: float = field(default=1e-8, metadata={"help": "Adam ε for β."})
    virtual_lr: Optional[float] = field(
        default=None,
        metadata={"help": "darts_virtual_sgd: step size ξ of the look-ahead w' = w − ξ∇L_train; None: the optimizer's lr."}
    )
    fd_epsilon: float = field(default=0.01, metadata={"help": "Finite-difference radius numerator: ε = fd_epsilon/‖v‖."})
    held_out_fraction: float = field(
        default=0.3, metadata={"help": "Share of the training set held out for β by run_autolora, in (0, 1)."}
    )
    phase: str = field(default="search", metadata={"help": "'search' (β learns) or 'selected' (ranks fixed)."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.AUTOLORA
        owner = type(self).__name__
        self._check_lora_fields(owner)
        check_int(owner, "r", self.r, minimum=1, cap=MAX_CONFIG_RANK)
        if self.threshold is not None:
            check_real(owner, "threshold", self.threshold, low=0.0, high=1.0, low_open=True)
        check_choice(owner, "selection_rule", self.selection_rule, SELECTION_RULES)
        if self.hypergradient in LEGACY_HYPERGRADIENTS:
            new = LEGACY_HYPERGRADIENTS[self.hypergradient]
            warnings.warn(f"{owner}.hypergradient={self.hypergradient!r} is the old name of {new!r}; reading it as "
                          f"{new!r}", FutureWarning, stacklevel=3)
            self.hypergradient = new
        check_choice(owner, "hypergradient", self.hypergradient, HYPERGRADIENTS)
        check_int(owner, "search_every", self.search_every, minimum=1)
        check_real(owner, "retrain_dropout", self.retrain_dropout, low=0.0, high=1.0, high_open=True)
        check_real(owner, "arch_lr", self.arch_lr, low=0.0, low_open=True)
        check_real(owner, "arch_beta1", self.arch_beta1, low=0.0, high=1.0, high_open=True)
        check_real(owner, "arch_beta2", self.arch_beta2, low=0.0, high=1.0, high_open=True)
        check_real(owner, "arch_eps", self.arch_eps, low=0.0, low_open=True)
        if self.virtual_lr is not None:
            check_real(owner, "virtual_lr", self.virtual_lr, low=0.0)
        check_real(owner, "fd_epsilon", self.fd_epsilon, low=0.0, low_open=True)
        check_real(owner, "held_out_fraction", self.held_out_fraction, low=0.0, high=1.0, low_open=True,
                   high_open=True)
        check_choice(owner, "phase", self.phase, PHASES)

    @property
    def effective_threshold(self) -> float:
        return self.threshold if self.threshold is not None else 1.0 / self.r
