"""Configuration of PRILoRA (Benedek, Wolf, Findings of EACL 2024)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from peft.utils import PeftType

from .._base.checks import MAX_CONFIG_RANK, _fail, check_bool, check_choice, check_int, check_real
from .._base.config import LowRankPeftConfig

SCHEDULES = ("cubic", "linear")
DEFAULT_R_FIRST, DEFAULT_R_LAST = 4, 12


@dataclass
class PriLoraConfig(LowRankPeftConfig):
    """PRILoRA: LoRA ranks that grow linearly with depth, plus ongoing pruning of ``A``.

    Benedek, Wolf. PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation. Findings of EACL
    2024, pp. 252–263. arXiv:2401.11316.

    **Ranks.** Block ``l`` of ``L`` (found from the module name, see ``block_index_pattern``) gets
    ``r_l = round(r_first + (r_last − r_first)·l/(L−1))`` (half rounds up) for every target in the
    block; the scaling is ``lora_alpha / r_l`` as in PEFT's LoRA with ``rank_pattern``. Give the
    ranks in exactly one way: ``r_first``/``r_last`` (default 4 → 12), or ``r_mean`` with
    ``r_spread`` (``r_first = r_mean − r_spread``, ``r_last = r_mean + r_spread``; ``r_spread``
    defaults to ``r_mean // 2``). Both ways at once are accepted only when they agree (as in a
    saved config, where the derived values are written out).

    **Pruning [reconstructed].** Importance ``S_ij = |A_ij|·sqrt(n_j)`` with ``n_j`` an EMA of the
    squared layer input per feature; every ``prune_every`` optimizer steps (and at ``prune_end``)
    the lowest-importance entries of each row of ``A`` are masked up to the scheduled sparsity.
    The schedule ramps from 0 at ``prune_start`` to ``final_sparsity`` at ``prune_end`` (cubic,
    Zhu & Gupta 2017, or linear). The pruning rule and its defaults are our reconstruction, not
    values read from the paper.
    """

    r_first: Optional[int] = field(default=None, metadata={"help": "Rank of the first block (default 4)."})
    r_last: Optional[int] = field(default=None, metadata={"help": "Rank of the last block (default 12)."})
    r_mean: Optional[int] = field(
        default=None, metadata={"help": "Alternative to r_first/r_last: mean rank; r_first/r_last = r_mean ∓ r_spread."}
    )
    r_spread: Optional[int] = field(
        default=None, metadata={"help": "With r_mean: half the rank difference between last and first block "
                                        "(default r_mean // 2; negative gives decreasing ranks)."}
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "Scaling numerator: s_l = lora_alpha / r_l (fixed)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    block_index_pattern: Optional[str] = field(
        default=None,
        metadata={"help": "Regex with one group capturing the block index in a module name, e.g. "
                          "r'\\.blocks\\.(\\d+)\\.'; None recognises transformer.h.N, model.layers.N, "
                          "encoder.layer.N, decoder.layers.N and block(s).N."},
    )
    num_blocks: Optional[int] = field(
        default=None, metadata={"help": "Number of blocks L; None reads it from the model (length of the block list)."}
    )
    ema_beta: float = field(default=0.9, metadata={"help": "EMA constant β of the input statistics, in [0, 1)."})
    prune_every: int = field(default=50, metadata={"help": "Optimizer steps between pruning events, >= 1."})
    prune_start: int = field(default=0, metadata={"help": "Step at which the sparsity ramp starts (sparsity 0 there)."})
    prune_end: int = field(default=1000, metadata={"help": "Step at which final_sparsity is reached, >= prune_start."})
    final_sparsity: float = field(
        default=0.5, metadata={"help": "Fraction of each row of A masked from prune_end on, in [0, 1)."}
    )
    sparsity_schedule: str = field(
        default="cubic", metadata={"help": "'cubic' (s_f·(1 − (1 − p)³), Zhu & Gupta 2017) or 'linear' (s_f·p)."}
    )
    regrow: bool = field(
        default=False,
        metadata={"help": "False: masked entries stay masked. True: each event recomputes the mask over all "
                          "entries, so a masked entry whose importance rose comes back with its stored value."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.PRILORA
        owner = type(self).__name__
        self._check_lora_fields(owner)
        self._resolve_ranks(owner)
        if self.block_index_pattern is not None:
            if not isinstance(self.block_index_pattern, str):
                _fail(owner, "block_index_pattern", self.block_index_pattern, "None or a regex string with one group")
            try:
                groups = re.compile(self.block_index_pattern).groups
            except re.error as e:
                _fail(owner, "block_index_pattern", self.block_index_pattern, f"a valid regex ({e})")
            if groups != 1:
                _fail(owner, "block_index_pattern", self.block_index_pattern,
                      f"a regex with exactly one capture group (the block index); it has {groups}")
        if self.num_blocks is not None:
            check_int(owner, "num_blocks", self.num_blocks, minimum=1)
        check_real(owner, "ema_beta", self.ema_beta, low=0.0, high=1.0, high_open=True)
        check_int(owner, "prune_every", self.prune_every, minimum=1)
        check_int(owner, "prune_start", self.prune_start, minimum=0)
        check_int(owner, "prune_end", self.prune_end, minimum=0)
        if self.prune_end < self.prune_start:
            _fail(owner, "prune_end", self.prune_end,
                  f"an integer in [{self.prune_start}, inf] (prune_end >= prune_start)")
        check_real(owner, "final_sparsity", self.final_sparsity, low=0.0, high=1.0, high_open=True)
        check_choice(owner, "sparsity_schedule", self.sparsity_schedule, SCHEDULES)
        check_bool(owner, "regrow", self.regrow)

    def _resolve_ranks(self, owner: str) -> None:
        """Exactly one way of giving the ranks; afterwards all four fields are filled and consistent."""
        for name in ("r_first", "r_last", "r_mean"):
            if getattr(self, name) is not None:
                check_int(owner, name, getattr(self, name), minimum=1, cap=MAX_CONFIG_RANK)
        if self.r_mean is None:
            if self.r_spread is not None:
                _fail(owner, "r_spread", self.r_spread, "None unless r_mean is given (or use r_first/r_last)")
            self.r_first = DEFAULT_R_FIRST if self.r_first is None else self.r_first
            self.r_last = DEFAULT_R_LAST if self.r_last is None else self.r_last
            return
        spread = self.r_mean // 2 if self.r_spread is None else self.r_spread
        check_int(owner, "r_spread", spread, minimum=-(self.r_mean - 1), maximum=self.r_mean - 1)
        first, last = self.r_mean - spread, self.r_mean + spread
        for name, derived in (("r_first", first), ("r_last", last)):
            given = getattr(self, name)
            if given is not None and given != derived:
                sign = "+" if name == "r_last" else "-"
                _fail(owner, name, given, f"None or {derived} (= r_mean {sign} r_spread) when r_mean is given; give "
                                          "the ranks either as r_first/r_last or as r_mean/r_spread")
        self.r_first, self.r_last, self.r_spread = first, last, spread
