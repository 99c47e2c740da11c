"""Configuration of RLoRA (Lei, Qian, Cheung, Findings of ACL 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from peft.utils import PeftType

from .._base.checks import MAX_CONFIG_RANK, _fail, check_bool, check_choice, check_int, check_real
from .._base.config import LowRankPeftConfig
from .projection import FINGERPRINT_PATTERN, PROJECTION_VERSION, SIZES_FINGERPRINT_PATTERN

PAC_BAYES_BOUNDS = ("mcallester", "linear")


def check_projection_size(owner: str, intrinsic_dim, projection_ratio, *, neither_ok: bool = False) -> None:
    """The size of RLoRA's trainable z: exactly one of ``intrinsic_dim`` (an integer >= 1) and
    ``projection_ratio`` (in (0, 1]); with ``neither_ok`` both may be None (the caller then picks a default).

    The one check of this rule: ``RLoraConfig`` uses it, and so can anything that builds an RLoRA config
    from its own options (the CLI). Raises ``ValueError`` naming the fields and values.
    """
    both = intrinsic_dim is not None and projection_ratio is not None
    if both or (intrinsic_dim is None and projection_ratio is None and not neither_ok):
        raise ValueError(
            f"{owner}: intrinsic_dim={intrinsic_dim!r} and projection_ratio={projection_ratio!r} is not "
            "allowed; set exactly one of them (e.g. projection_ratio=0.05, or intrinsic_dim=512)."
        )
    if intrinsic_dim is not None:
        check_int(owner, "intrinsic_dim", intrinsic_dim, minimum=1)
    elif projection_ratio is not None:
        check_real(owner, "projection_ratio", projection_ratio, low=0.0, high=1.0, low_open=True)


@dataclass
class RLoraConfig(LowRankPeftConfig):
    """RLoRA: LoRA factors generated from a small trainable vector ``z`` by a Fastfood projection.

    Per target module ``vec(A, B) = (A0, 0) + P z`` with ``P`` a randomized Walsh–Hadamard
    (Fastfood) projection regenerated from ``(seed, module name)``; only ``z`` (size
    ``intrinsic_dim`` or ``ceil(projection_ratio · r·(d_in+d_out))``) is trained and saved. An
    optional PAC-Bayes regularizer on ``z`` is applied at every optimizer step. The Fastfood
    parametrisation and the regularizer's exact form are reconstructions (see the README).
    """

    r: int = field(default=8, metadata={"help": "Rank of the generated LoRA factors."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA scaling numerator: ΔW = (lora_alpha / r)·B A."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, in [0, 1)."})
    intrinsic_dim: Optional[int] = field(
        default=None, metadata={"help": "Trainable size d per module (set this or projection_ratio)."}
    )
    projection_ratio: Optional[float] = field(
        default=None, metadata={"help": "d = ceil(ratio · D) per module, ratio in (0, 1] (set this or intrinsic_dim)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the Fastfood randomness and of A0 (with the module name)."})
    learnable_scale: bool = field(
        default=False, metadata={"help": "SAID-style trainable scalar per module multiplying P z."}
    )
    pac_bayes_weight: float = field(
        default=0.0, metadata={"help": "Weight of the PAC-Bayes term; 0 disables it. >0 needs num_train_examples."}
    )
    pac_bayes_bound: str = field(
        default="mcallester",
        metadata={"help": "'mcallester': sqrt((KL + ln(2√n/δ)) / 2n); 'linear': KL / n (each times the weight)."},
    )
    num_train_examples: Optional[int] = field(default=None, metadata={"help": "n in the bound: training-set size."})
    pac_bayes_max_grad_norm: Optional[float] = field(
        default=1.0,
        metadata={"help": "After adding the regularizer's gradient, clip the combined gradient of the model's "
                          "trainable parameters to this norm (default 1.0, Trainer's default max_grad_norm). None: "
                          "add the regularizer's gradient unclipped (the behaviour before this option)."},
    )
    pac_bayes_delta: float = field(default=0.05, metadata={"help": "Confidence δ of the bound, in (0, 1)."})
    prior_sigma: float = field(default=0.1, metadata={"help": "σ_p of the prior N(0, σ_p² I) on z."})
    posterior_sigma: float = field(default=0.01, metadata={"help": "σ_q of the posterior N(z, σ_q² I) (initial value)."})
    learn_posterior_sigma: bool = field(
        default=False, metadata={"help": "Train log σ_q per module (saved as one scalar per module)."}
    )
    noise_injection: bool = field(
        default=False, metadata={"help": "In training mode, use z + σ_q·ε in the forward pass."}
    )
    init_std: Optional[float] = field(
        default=None,
        metadata={"help": "With init_weights=False, z starts as N(0, init_std²). None (default): per module the "
                          "std that gives the generated B the spread of LoRA's init_lora_weights=False "
                          "(std 1/sqrt(3r)), so the adapter is not a no-op, as PEFT's convention is."},
    )
    batch_projection: bool = field(
        default=True,
        metadata={"help": "Generate all modules' factors in grouped launches once per forward pass (False: per layer)."},
    )
    projection_version: int = field(
        default=PROJECTION_VERSION, metadata={"help": "Layout version of the regenerated projection (checked on load)."}
    )
    projection_fingerprint: Optional[str] = field(
        default=None,
        metadata={"help": "Hash of a regenerated reference projection (filled in at wrap time; checked on load)."},
    )
    projection_sizes_fingerprint: Optional[str] = field(
        default=None,
        metadata={"help": "Hash of sampled entries of every module's generated projection, at the sizes the adapter "
                          "uses (filled in at wrap time; checked on load; None in adapters saved before it existed)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType.RLORA
        owner = type(self).__name__
        self._check_lora_fields(owner)
        check_int(owner, "r", self.r, minimum=1, cap=MAX_CONFIG_RANK)
        check_projection_size(owner, self.intrinsic_dim, self.projection_ratio)
        check_int(owner, "seed", self.seed, minimum=0)
        check_bool(owner, "learnable_scale", self.learnable_scale)
        check_real(owner, "pac_bayes_weight", self.pac_bayes_weight, low=0.0)
        check_choice(owner, "pac_bayes_bound", self.pac_bayes_bound, PAC_BAYES_BOUNDS)
        if self.pac_bayes_weight > 0 and self.num_train_examples is None:
            _fail(owner, "num_train_examples", None,
                  f"the training-set size (an integer >= 1) when pac_bayes_weight={self.pac_bayes_weight!r} > 0")
        if self.num_train_examples is not None:
            check_int(owner, "num_train_examples", self.num_train_examples, minimum=1)
        if self.pac_bayes_max_grad_norm is not None:
            check_real(owner, "pac_bayes_max_grad_norm", self.pac_bayes_max_grad_norm, low=0.0, low_open=True)
        check_real(owner, "pac_bayes_delta", self.pac_bayes_delta, low=0.0, high=1.0, low_open=True, high_open=True)
        check_real(owner, "prior_sigma", self.prior_sigma, low=0.0, low_open=True)
        check_real(owner, "posterior_sigma", self.posterior_sigma, low=0.0, low_open=True)
        check_bool(owner, "learn_posterior_sigma", self.learn_posterior_sigma)
        check_bool(owner, "noise_injection", self.noise_injection)
        if self.init_std is not None:
            check_real(owner, "init_std", self.init_std, low=0.0)
        check_bool(owner, "batch_projection", self.batch_projection)
        self._check_projection_identity(owner)

    def _check_projection_identity(self, owner: str) -> None:
        """Refuse an adapter whose saved z was made for a different projection layout than this install's.

        Cheap checks only: the fingerprint itself is regenerated and compared when the model is wrapped
        (``projection.stamp_projection_fingerprint``), not whenever a config is built.
        """
        if self.projection_version != PROJECTION_VERSION:
            raise ValueError(
                f"{owner}.projection_version={self.projection_version!r} is not allowed; this install of "
                f"peft_lowrank_ext regenerates projection version {PROJECTION_VERSION} only, so the saved z would "
                "produce different weights. Load it with the package version that saved it, or export it to plain "
                "LoRA there (export_lora)."
            )
        fingerprint = self.projection_fingerprint
        well_formed = isinstance(fingerprint, str) and FINGERPRINT_PATTERN.fullmatch(fingerprint) is not None
        if fingerprint is not None and not well_formed:
            _fail(owner, "projection_fingerprint", fingerprint,
                  "None (filled in when the model is wrapped) or the 16 hexadecimal digits saved with an adapter")
        sizes = self.projection_sizes_fingerprint
        if sizes is not None and not (isinstance(sizes, str) and SIZES_FINGERPRINT_PATTERN.fullmatch(sizes)):
            _fail(owner, "projection_sizes_fingerprint", sizes,
                  "None (filled in when the model is wrapped) or the '<8 hex>-<16 hex>' digits saved with an adapter")

    def z_init_std(self, intrinsic_dim: int, total_dim: int) -> float:
        """Std of z's initial values under ``init_weights=False`` for a module with ``d = intrinsic_dim`` and
        ``D = total_dim``: ``init_std`` if given, else the std that gives every generated entry of (A − A0, B)
        the spread of LoRA's ``init_lora_weights=False`` B.

        The Fastfood projection ``P z = H G Π H B pad(z) / (‖g‖ √D)`` maps z ~ N(0, σ²) to entries of variance
        σ²·d/D; LoRA's B under ``init_lora_weights=False`` is U(−1/√r, 1/√r), of variance 1/(3r).
        """
        if self.init_std is not None:
            return self.init_std
        return math.sqrt(total_dim / (3.0 * self.r * intrinsic_dim))

    @property
    def pac_bayes_enabled(self) -> bool:
        return self.pac_bayes_weight > 0
