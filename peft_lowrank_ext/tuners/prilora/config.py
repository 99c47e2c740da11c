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
# The schedule as fractions of the run [ours]: start at once (the cubic ramp prunes little early on), reach
# final_sparsity at 80% so the last fifth trains at the final mask, one event per 2% (~40 gradual events).
DEFAULT_PRUNE_START_FRACTION, DEFAULT_PRUNE_END_FRACTION, DEFAULT_PRUNE_EVERY_FRACTION = 0.0, 0.8, 0.02


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

    **Schedule relative to the run [ours].** Start, end and spacing are fractions of the run's total
    optimizer steps (defaults 0.0, 0.8, 0.02), so short and long runs both reach ``final_sparsity``
    at the same point of training. The total comes from ``total_steps``, from
    ``PriLoraScheduleCallback`` (Trainer / SFTTrainer: ``state.max_steps``) or from
    ``set_prilora_total_steps``; absolute ``prune_start`` / ``prune_end`` / ``prune_every`` override
    their fraction (all three absolute: no total needed). Without a total where one is needed, the
    first optimizer step raises an error saying how to give it.
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
    prune_start_fraction: Optional[float] = field(
        default=None, metadata={"help": "Where the sparsity ramp starts, as a fraction of the run's total steps, in "
                                        "[0, 1] (None: 0.0)."})
    prune_end_fraction: Optional[float] = field(
        default=None, metadata={"help": "Where final_sparsity is reached, as a fraction of the run's total steps, in "
                                        "[0, 1] and >= the start (None: 0.8)."})
    prune_every_fraction: Optional[float] = field(
        default=None, metadata={"help": "Distance between pruning events, as a fraction of the run's total steps, in "
                                        "(0, 1] (None: 0.02, at least one step)."})
    total_steps: Optional[int] = field(
        default=None, metadata={"help": "Optimizer steps of the run, to turn the fractions into steps. None: read "
                                        "from Trainer/SFTTrainer by PriLoraScheduleCallback, or given by "
                                        "set_prilora_total_steps(model, n)."})
    prune_start: Optional[int] = field(
        default=None, metadata={"help": "Absolute override of prune_start_fraction: step at which the ramp starts."})
    prune_end: Optional[int] = field(
        default=None, metadata={"help": "Absolute override of prune_end_fraction: step at which final_sparsity is "
                                        "reached."})
    prune_every: Optional[int] = field(
        default=None, metadata={"help": "Absolute override of prune_every_fraction: optimizer steps between pruning "
                                        "events, >= 1."})
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
        self._check_schedule(owner)
        check_real(owner, "final_sparsity", self.final_sparsity, low=0.0, high=1.0, high_open=True)
        check_choice(owner, "sparsity_schedule", self.sparsity_schedule, SCHEDULES)
        check_bool(owner, "regrow", self.regrow)

    def _check_schedule(self, owner: str) -> None:
        """Each schedule quantity given as a fraction of the run or as an absolute step, not contradicting."""
        from .pruning import resolve_schedule

        if self.total_steps is not None:
            check_int(owner, "total_steps", self.total_steps, minimum=1)
        for name in ("prune_start_fraction", "prune_end_fraction"):
            if getattr(self, name) is not None:
                check_real(owner, name, getattr(self, name), low=0.0, high=1.0)
        if self.prune_every_fraction is not None:
            check_real(owner, "prune_every_fraction", self.prune_every_fraction, low=0.0, high=1.0, low_open=True)
        if self.prune_start is not None:
            check_int(owner, "prune_start", self.prune_start, minimum=0)
        if self.prune_end is not None:
            check_int(owner, "prune_end", self.prune_end, minimum=0)
        if self.prune_every is not None:
            check_int(owner, "prune_every", self.prune_every, minimum=1)
        start_f = DEFAULT_PRUNE_START_FRACTION if self.prune_start_fraction is None else self.prune_start_fraction
        end_f = DEFAULT_PRUNE_END_FRACTION if self.prune_end_fraction is None else self.prune_end_fraction
        if end_f < start_f:
            _fail(owner, "prune_end_fraction", self.prune_end_fraction,
                  f"a finite number in [{start_f}, 1.0] (prune_end_fraction >= prune_start_fraction)")
        for absolute in ("prune_start", "prune_end", "prune_every"):
            fraction = absolute + "_fraction"
            if getattr(self, absolute) is not None and getattr(self, fraction) is not None and self.total_steps is None:
                _fail(owner, absolute, getattr(self, absolute),
                      f"None when {fraction}={getattr(self, fraction)!r} is given (give the step or the fraction of "
                      "the run, not both; both are accepted only with total_steps, when they agree)")
        if self.prune_start is not None and self.prune_end is not None and self.prune_end < self.prune_start:
            _fail(owner, "prune_end", self.prune_end,
                  f"an integer in [{self.prune_start}, inf] (prune_end >= prune_start)")
        if self.total_steps is not None:
            resolve_schedule(self, self.total_steps, owner=owner)

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
