"""Fused Triton Fastfood chain under the interpreter (run by test_interpreter.py)."""

from __future__ import annotations

import os

import pytest
import torch
from _kernel_checks import DTYPES, assert_close, random_fastfood_factors

from peft_lowrank_ext.kernels import _triton_hadamard as th
from peft_lowrank_ext.kernels._triton_fastfood import fastfood_backward_triton, fastfood_forward_triton
from peft_lowrank_ext.kernels.fastfood import _row_scale, fastfood_backward_reference, fastfood_reference

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_interpreter.py"

# (modules M, d, out_dim, L): tiny L, d = 1, out_dim = L, odd sizes, and a two-pass L = 2^15.
SHAPES = [(4, 5, 16, 16), (3, 1, 64, 64), (3, 10, 50, 64), (5, 37, 1000, 1024), (2, 100, 3000, 4096),
          (1, 1000, 20000, 1 << 15)]


def _run(rows, d, out_dim, length, z_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, d, generator=gen).to(z_dtype)
    signs, perm, gauss = random_fastfood_factors(rows, length, gen)
    grad = torch.randn(rows, out_dim, generator=gen)
    theta = fastfood_forward_triton(z, signs, perm, gauss, _row_scale(gauss, out_dim, torch.float32), out_dim)
    grad_z = fastfood_backward_triton(grad, signs, perm, gauss, _row_scale(gauss, out_dim, torch.float32), d)
    ref = fastfood_reference(z.double(), signs.double(), perm, gauss.double(), out_dim)
    grad_ref = fastfood_backward_reference(grad.double(), signs.double(), perm, gauss.double(), d)
    return (theta, ref), (grad_z, grad_ref)


@pytest.mark.parametrize("rows,d,out_dim,length", SHAPES)
def test_forward_and_backward_match_float64(rows, d, out_dim, length):
    (theta, ref), (grad_z, grad_ref) = _run(rows, d, out_dim, length)
    assert theta.dtype == grad_z.dtype == torch.float32
    assert_close(theta, ref, torch.float32, "theta")
    assert_close(grad_z, grad_ref, torch.float32, "grad z")


@pytest.mark.parametrize("z_dtype", DTYPES, ids=str)
def test_half_precision_z(z_dtype):
    """z is read in its own dtype and upcast on load: the result stays fp32-accurate."""
    (theta, ref), _ = _run(3, 70, 500, 512, z_dtype)
    assert_close(theta, ref, torch.float32, f"theta from {z_dtype} z")


def test_three_pass_chain(monkeypatch):
    """Gather in the first pass and scatter in the last pass of a three-pass transform."""
    monkeypatch.setattr(th, "MAX_CONTIG_LOG2", 8)
    monkeypatch.setattr(th, "MAX_STRIDED_LOG2", 4)
    (theta, ref), (grad_z, grad_ref) = _run(1, 300, 40000, 1 << 16)
    assert_close(theta, ref, torch.float32, "theta")
    assert_close(grad_z, grad_ref, torch.float32, "grad z")


def test_backward_is_the_adjoint():
    """<P z, y> == <z, Pᵀ y> for the kernels themselves."""
    gen = torch.Generator().manual_seed(3)
    rows, d, out_dim, length = 3, 40, 900, 1024
    z, y = torch.randn(rows, d, generator=gen), torch.randn(rows, out_dim, generator=gen)
    signs, perm, gauss = random_fastfood_factors(rows, length, gen)
    scale = _row_scale(gauss, out_dim, torch.float32)
    lhs = (fastfood_forward_triton(z, signs, perm, gauss, scale, out_dim).double() * y).sum()
    rhs = (z.double() * fastfood_backward_triton(y, signs, perm, gauss, scale, d).double()).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-5)
