"""Shared checks for the kernel tests: float64 references and per-dtype tolerances."""

from __future__ import annotations

import torch

# Max error relative to the largest reference magnitude. bf16 allows two bf16 ulps: the Triton
# interpreter truncates fp32 -> bf16 stores instead of rounding them.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Background jobs started by conftest.py: interpreter modules, and the sm_90 compile report.
INTERPRETER_MODULES = ("interp_hadamard", "interp_fastfood", "interp_masked_lowrank")
SM90_JSON = "sm90.json"


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "") -> None:
    """``max|out - ref| <= tol[dtype] * max|ref|`` with ``ref`` computed in float64."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOLERANCE[dtype or out.dtype]
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} x max|ref| {scale:.3g}"


def random_fastfood_factors(rows: int, length: int, generator: torch.Generator | None = None):
    """±1 signs, permutations and Gaussians of shape (rows, length)."""
    signs = torch.randint(0, 2, (rows, length), generator=generator).float() * 2 - 1
    perm = torch.stack([torch.randperm(length, generator=generator) for _ in range(rows)])
    gauss = torch.randn(rows, length, generator=generator)
    return signs, perm, gauss
