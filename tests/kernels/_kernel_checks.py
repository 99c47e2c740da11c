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


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, what: str = "",
                 bound: torch.Tensor | None = None) -> None:
    """``max|out - ref| <= tol[dtype] * max|ref|`` with ``ref`` computed in float64.

    With ``bound`` (the same computation in float64 on the absolute values of every input), the
    check is elementwise ``|out - ref| <= tol[dtype] * bound``: the forward error bound of a sum of
    products, which stays meaningful when the sum cancels to far below its terms.
    """
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOLERANCE[dtype or out.dtype]
    if bound is not None:
        assert bound.shape == ref.shape and bool((bound >= ref.double().abs() - 1e-12).all()), f"{what}: bad bound"
        excess = (out.double() - ref.double()).abs() - tol * bound.double()
        worst = int(excess.argmax()) if excess.numel() else 0
        assert excess.numel() == 0 or excess.max().item() <= 1e-30, (
            f"{what}: error {(out.double() - ref.double()).abs().flatten()[worst].item():.3g} > {tol:g} x "
            f"bound {bound.double().flatten()[worst].item():.3g} at flat index {worst}"
        )
        return
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} x max|ref| {scale:.3g}"


def random_fastfood_factors(rows: int, length: int, generator: torch.Generator | None = None):
    """±1 signs, permutations and Gaussians of shape (rows, length)."""
    signs = torch.randint(0, 2, (rows, length), generator=generator).float() * 2 - 1
    perm = torch.stack([torch.randperm(length, generator=generator) for _ in range(rows)])
    gauss = torch.randn(rows, length, generator=generator)
    return signs, perm, gauss
