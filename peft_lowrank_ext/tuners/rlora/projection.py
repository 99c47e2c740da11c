"""The Fastfood projection that turns RLoRA's small vector ``z`` into LoRA factors.

Nothing here is saved: the random signs, permutation, Gaussian scales and the LoRA init ``A0`` are
regenerated from ``(seed, module name)`` with a CPU generator, so an adapter on disk holds only ``z``.
``PROJECTION_VERSION`` names this exact layout; change it whenever the generated numbers change.
The projection itself, ``P z = [H diag(g) Π H diag(b) pad_L(z)]_{:D} / (‖g‖ √D)``, is the
``fastfood_project`` kernel op (Triton on CUDA, PyTorch elsewhere).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import torch

from ...kernels.fastfood import fastfood_project, validate_perm

PROJECTION_VERSION = 1
# What projection_fingerprint() returns: 16 lowercase hexadecimal digits.
FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{16}")
SIZES_FINGERPRINT_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{16}")  # <layout>-<values>


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def module_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed that depends only on the user seed, the module name and the layout version."""
    digest = hashlib.sha256(f"rlora-v{PROJECTION_VERSION}:{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class FastfoodProjection:
    """Per-module randomness of one RLoRA adapter, generated on CPU and cached per device."""

    r: int
    in_features: int
    out_features: int
    intrinsic_dim: int
    seed: int
    signs: torch.Tensor
    perm: torch.Tensor
    gauss: torch.Tensor
    lora_a_init: torch.Tensor
    _on_device: dict = field(default_factory=dict, repr=False)

    @property
    def total_dim(self) -> int:
        """D = r·(d_in + d_out), the size of vec(A, B)."""
        return self.r * (self.in_features + self.out_features)

    @classmethod
    def generate(cls, *, r: int, in_features: int, out_features: int, intrinsic_dim: int, seed: int, module_name: str):
        total = r * (in_features + out_features)
        length = next_power_of_two(max(total, intrinsic_dim))
        gen = torch.Generator(device="cpu").manual_seed(module_seed(seed, module_name))
        signs = torch.randint(0, 2, (length,), generator=gen, dtype=torch.int64).float().mul_(2).sub_(1)
        perm = torch.randperm(length, generator=gen)
        gauss = torch.randn(length, generator=gen)
        # LoRA's A init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(d_in), 1/sqrt(d_in)).
        bound = 1.0 / math.sqrt(in_features)
        lora_a_init = torch.rand(r, in_features, generator=gen).mul_(2 * bound).sub_(bound)
        return cls(r, in_features, out_features, intrinsic_dim, seed, signs, perm, gauss, lora_a_init)

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(signs, perm, gauss, A0) on ``device``, moved once and then reused."""
        key = str(device)
        if key not in self._on_device:
            validate_perm(self.perm[None], 1, self.perm.numel(), what="RLoRA projection")  # on CPU, once
            # On CUDA the kernels read int32 indices: convert once here, not on every projection.
            perm = self.perm.to(torch.int32) if torch.device(device).type == "cuda" else self.perm
            self._on_device[key] = tuple(t.to(device) for t in (self.signs, perm, self.gauss, self.lora_a_init))
        return self._on_device[key]

    def factors(self, z: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Materialise fp32 ``(A, B)`` = ``(A0, 0) + scale · P z``."""
        signs, perm, gauss, _ = self.tensors(z.device)
        delta = fastfood_project(z[None], signs[None], perm[None], gauss[None], self.total_dim, check_perm=False)[0]
        return self.factors_from_projection(delta, scale)

    def factors_from_projection(
        self, delta: torch.Tensor, scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` from an already computed ``P z`` of length D (e.g. from a grouped launch)."""
        lora_a_init = self.tensors(delta.device)[3]
        if scale is not None:
            delta = delta * scale
        split = self.r * self.in_features
        lora_a = lora_a_init + delta[:split].view(self.r, self.in_features)
        lora_b = delta[split:].view(self.out_features, self.r)
        return lora_a, lora_b


def projection_fingerprint(seed: int) -> str:
    """Hash of a small regenerated projection: detects a changed layout or random generator on load.

    Only RNG outputs (rounded) enter the hash, so it is stable across machines and BLAS libraries.
    """
    proj = FastfoodProjection.generate(
        r=2, in_features=12, out_features=10, intrinsic_dim=8, seed=seed, module_name="__fingerprint__"
    )
    h = hashlib.sha256(f"v{PROJECTION_VERSION}".encode())
    h.update(proj.signs.to(torch.int8).numpy().tobytes())
    h.update(proj.perm.numpy().tobytes())
    for t in (proj.gauss, proj.lora_a_init):
        h.update(torch.round(t * 1000).to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


_SAMPLES = 16  # entries hashed per generated tensor, evenly spaced from the first to the last


def _sample_bytes(t: torch.Tensor) -> bytes:
    flat = t.reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, min(_SAMPLES, flat.numel())).round().long()
    sample = flat[idx]
    if sample.is_floating_point():
        sample = torch.round(sample * 1000)
    return sample.to(torch.int64).numpy().tobytes()


def sizes_fingerprint(projections: dict[str, FastfoodProjection]) -> str:
    """``<layout>-<values>``: a hash of the modules' names and sizes, and one of evenly spaced entries of every
    module's generated signs, permutation, scales and A0 [ours].

    Why: a generator change may only affect some sizes (``projection_fingerprint`` regenerates a single
    length-64 projection); this covers every (size, module seed) the adapter actually uses, at no extra
    generation cost. Only RNG outputs (rounded) enter the values hash, so it is stable across machines; the
    layout hash tells a different base model (other sizes: PEFT's own size check reports it) from a
    different generator.
    """
    layout = hashlib.sha256(f"v{PROJECTION_VERSION}:layout".encode())
    values = hashlib.sha256(f"v{PROJECTION_VERSION}:sizes".encode())
    for name in sorted(projections):
        proj = projections[name]
        layout.update(f"{name}:{proj.r}:{proj.in_features}:{proj.out_features}:{proj.intrinsic_dim}:"
                      f"{proj.signs.numel()};".encode())
        for t in (proj.signs, proj.perm, proj.gauss, proj.lora_a_init):
            values.update(_sample_bytes(t))
    return f"{layout.hexdigest()[:8]}-{values.hexdigest()[:16]}"


def stamp_sizes_fingerprint(config, projections: dict[str, FastfoodProjection], owner: str) -> None:
    """Fill in ``config.projection_sizes_fingerprint`` after the adapter's layers are built, or refuse a saved
    adapter whose projections, at the sizes it uses, this install generates differently.

    Adapters saved before this field existed (None) are filled in: only their ``projection_fingerprint`` was
    checked. A saved layout other than this model's (a different base model) is left to PEFT's size check.
    """
    if not projections:
        return
    current = sizes_fingerprint(projections)
    saved = config.projection_sizes_fingerprint
    if saved is None:
        config.projection_sizes_fingerprint = current
    elif saved != current and saved.split("-")[0] == current.split("-")[0]:
        raise ValueError(
            f"{owner}.projection_sizes_fingerprint={saved!r} is not allowed; this "
            f"install generates {current!r} for the projections of these {len(projections)} modules (seed "
            f"{config.seed}): a different random generator at the sizes this adapter uses, so the saved z would "
            "produce different weights. Use the torch/peft_lowrank_ext versions that saved the adapter, or export "
            "it to plain LoRA there (export_lora)."
        )


def stamp_projection_fingerprint(config, owner: str) -> None:
    """Fill in ``config.projection_fingerprint`` for a new adapter, or refuse a saved one this install does not
    regenerate (a different random generator or layout would give the saved z different weights).

    Runs when a model is wrapped or an adapter loaded (``RLoraModel``), so building a config stays cheap.
    """
    current = projection_fingerprint(config.seed)
    if config.projection_fingerprint is None:
        config.projection_fingerprint = current
    elif config.projection_fingerprint != current:
        raise ValueError(
            f"{owner}.projection_fingerprint={config.projection_fingerprint!r} is not allowed; this install "
            f"regenerates fingerprint {current!r} for seed {config.seed} (a different random generator or layout), "
            "so the saved z would produce different weights. Use the torch/peft_lowrank_ext versions that saved "
            "the adapter, or export it to plain LoRA there (export_lora)."
        )
