"""Triton FWHT kernel under the interpreter (run by test_interpreter.py with TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import pytest
import torch
from _kernel_checks import DTYPES, assert_close

from peft_lowrank_ext.kernels import _triton_hadamard as th
from peft_lowrank_ext.kernels.hadamard import fwht_reference, hadamard_matrix

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_interpreter.py"

# (rows, log2 n): odd row counts leave partial tiles. fp32 takes two passes from 2^14 on; fp16/bf16 (half
# operands) hold up to 2^15 in one program (14, 15 single-pass) and take two passes, through a workspace
# in their own dtype, from 2^16 on.
SHAPES = [(1, 4), (3, 4), (33, 5), (7, 6), (2, 7), (17, 8), (3, 9), (1, 10), (5, 11), (2, 12), (3, 13), (1, 14)]
CASES = [(dt, rows, k) for dt in DTYPES for rows, k in SHAPES] + [
    (torch.float32, 2, 16), (torch.float32, 1, 18), (torch.bfloat16, 1, 15), (torch.float16, 1, 16),
    (torch.bfloat16, 1, 17)]


def test_pass_plans():
    """One program per row up to 2^13 (fp32) or 2^15 (half operands, 16 warps); then strided passes."""
    assert [len(th.plan_passes(k)) for k in (13, 14, 18)] == [1, 2, 2]
    assert [len(th.plan_passes(k, half=True)) for k in (13, 15, 16, 24)] == [1, 1, 2, 2]
    wide = th.plan_passes(15, half=True)[0].config
    assert wide.lines == 1 and wide.num_warps == th.WIDE_NUM_WARPS
    assert th.dot_mode(torch.float32) == th.DOT_SPLIT and th.dot_mode(torch.bfloat16) == th.DOT_HALF_EMULATED
    assert th.dot_mode(torch.float16, interpret=False) == th.DOT_HALF


def _dense_reference(x: torch.Tensor) -> torch.Tensor:
    return x.double() @ hadamard_matrix(x.shape[-1], torch.float64)


@pytest.mark.parametrize("dtype,rows,log2_n", CASES, ids=str)
def test_fwht_matches_float64(dtype, rows, log2_n):
    torch.manual_seed(rows * 100 + log2_n)
    x = torch.randn(rows, 1 << log2_n).to(dtype)
    ref = _dense_reference(x) if log2_n <= 12 else fwht_reference(x.double())
    out = th.fwht_triton(x)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, f"fwht {dtype} rows={rows} n=2^{log2_n}")


def test_fwht_batched_leading_dims_and_empty():
    x = torch.randn(2, 3, 64)
    assert_close(th.fwht_triton(x), fwht_reference(x.double()), torch.float32)
    assert th.fwht_triton(torch.empty(0, 64)).shape == (0, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_three_pass_path(monkeypatch, dtype):
    """Shrink the per-program limits so a small transform takes one contiguous + two strided passes."""
    monkeypatch.setattr(th, "MAX_CONTIG_LOG2", 8)
    monkeypatch.setattr(th, "MAX_CONTIG_LOG2_HALF", 8)
    monkeypatch.setattr(th, "MAX_STRIDED_LOG2", 4)
    assert th.plan_chunks(16) == th.plan_chunks(16, half=True) == [8, 4, 4]
    x = torch.randn(1, 1 << 16).to(dtype)
    assert_close(th.fwht_triton(x), fwht_reference(x.double()), dtype, "three passes")


@pytest.mark.parametrize("dtype,rows,log2_n", [(torch.float16, 2, 10), (torch.float16, 1, 15), (torch.float16, 1, 16),
                                                 (torch.float32, 3, 8)],
                         ids=str)
def test_scale_applied_before_the_store(dtype, rows, log2_n):
    """fp16 rows whose unnormalised transform overflows (H x[0] ~ 128·n > 65504): the scaled
    kernel output is finite and matches float64; the scale is applied as the first pass loads, so no fp16
    intermediate overflows either (at 2^15 in one pass, at 2^16 through an fp16 workspace)."""
    n = 1 << log2_n
    torch.manual_seed(log2_n)
    x = (128.0 + 4.0 * torch.randn(rows, n)).to(dtype)
    if dtype == torch.float16:
        assert torch.isinf(th.fwht_triton(x)).any()
    out = th.fwht_triton(x, n ** -0.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, fwht_reference(x.double(), n ** -0.5), dtype, f"scaled fwht {dtype} n=2^{log2_n}")


def test_backward_is_the_same_transform():
    """H is symmetric: the vector-Jacobian product of the kernel is the kernel itself."""
    x, g = torch.randn(5, 256, dtype=torch.float64), torch.randn(5, 256, dtype=torch.float64)
    lhs = (th.fwht_triton(x.float()).double() * g).sum()
    rhs = (x * th.fwht_triton(g.float()).double()).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-5)


@pytest.mark.skipif(os.environ.get("KERNELS_SLOW") != "1", reason="about 25 s in the interpreter; KERNELS_SLOW=1")
def test_length_2_pow_22():
    x = torch.randn(1, 1 << 22)
    assert_close(th.fwht_triton(x), fwht_reference(x.double()), torch.float32, "n=2^22")
