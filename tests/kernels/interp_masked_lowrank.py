"""Triton masked / gated low-rank kernels under the interpreter (run by test_interpreter.py)."""

from __future__ import annotations

import os

import pytest
import torch
from _kernel_checks import DTYPES, assert_close

from peft_lowrank_ext.kernels._triton_masked_lowrank import masked_lowrank_bwd_triton, masked_lowrank_fwd_triton
from peft_lowrank_ext.kernels.masked_lowrank import masked_lowrank_backward_reference, masked_lowrank_reference

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_interpreter.py"

SCALE = 0.7


def _inputs(n, d_in, d_out, r, dtype, active, with_mask, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen).to(dtype)
    a = torch.randn(r, d_in, generator=gen).to(dtype)
    b = torch.randn(d_out, r, generator=gen).to(dtype)
    gate = torch.rand(r, generator=gen) + 0.1
    gate[torch.randperm(r, generator=gen)[active:]] = 0.0
    mask = (torch.rand(r, d_in, generator=gen) > 0.3).float() if with_mask else None
    grad_y = torch.randn(n, d_out, generator=gen).to(dtype)
    return x, a, b, gate, mask, grad_y


def _check(n, d_in, d_out, r, dtype, active, with_mask, gate_grad, splits=None, base_dtype=None):
    x, a, b, gate, mask, grad_y = _inputs(n, d_in, d_out, r, dtype, active, with_mask)
    base = None if base_dtype is None else torch.randn(n, d_out, generator=torch.Generator().manual_seed(5)).to(
        base_dtype)
    y, h = masked_lowrank_fwd_triton(x, a, b, gate, mask, SCALE, skip_zero_gates=not gate_grad, base=base)
    grads = masked_lowrank_bwd_triton(grad_y, x, a, b, gate, mask, h, SCALE, gate_grad, splits=splits)

    f64 = [t.double() if t is not None else None for t in (x, a, b, gate, mask)]
    y_ref, h_ref = masked_lowrank_reference(*f64, SCALE)
    refs = masked_lowrank_backward_reference(grad_y.double(), *f64, h_ref, SCALE, gate_grad)
    # Error bounds: the same products on |x|, |A|, |B|, |dy| (gate and mask are >= 0).
    f64_abs = [t.abs() if t is not None else None for t in f64]
    y_abs, h_abs = masked_lowrank_reference(*f64_abs, SCALE)
    bounds = masked_lowrank_backward_reference(grad_y.double().abs(), *f64_abs, h_abs, SCALE, gate_grad)
    if base is not None:  # base + update, summed in fp32 and rounded once to base's dtype
        assert y.dtype == base.dtype
        y_ref, y_abs, dtype = y_ref + base.double(), y_abs + base.double().abs(), base.dtype
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", bound=y_abs)
    for name, got, ref, bound in zip(("dx", "dA", "dB", "dgate"), grads, refs, bounds):
        assert_close(got, ref, got.dtype if name != "dgate" else torch.float32, name, bound=bound)


# (N, d_in, d_out, r): odd token counts, r not a multiple of 16, r = 1, widths 16 and 64.
SHAPES = [(37, 70, 50, 8), (130, 100, 129, 40), (65, 64, 64, 64), (1, 16, 16, 1), (200, 33, 17, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d_in,d_out,r", SHAPES)
def test_matches_float64(dtype, n, d_in, d_out, r):
    _check(n, d_in, d_out, r, dtype, active=r, with_mask=True, gate_grad=True)


@pytest.mark.parametrize("active", [64, 48, 32, 20, 16, 10, 0])
def test_zero_gates_are_skipped_at_every_width(active):
    """Active-rank counts that select the 64-, 32- and 16-wide code paths, and none at all."""
    _check(70, 48, 40, 64, torch.float32, active, with_mask=False, gate_grad=False)


@pytest.mark.parametrize("gate_grad", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_gate_gradient_and_mask_combinations(gate_grad, with_mask):
    _check(45, 40, 30, 12, torch.float32, active=6, with_mask=with_mask, gate_grad=gate_grad)


@pytest.mark.parametrize("x_dtype,base_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("active", [12, 0])
def test_base_output_accumulated_in_the_epilogue(x_dtype, base_dtype, active):
    """The layer's base output added in the kernel; with every gate zero y is exactly the base output."""
    _check(45, 40, 30, 12, x_dtype, active=active, with_mask=True, gate_grad=False, base_dtype=base_dtype)


@pytest.mark.parametrize("splits", [1, 3])
def test_token_splits_of_the_weight_gradients(splits):
    _check(300, 40, 50, 24, torch.float32, active=24, with_mask=True, gate_grad=True, splits=splits)


def test_no_tokens():
    x, a, b, gate, mask, grad_y = _inputs(0, 16, 16, 4, torch.float32, 4, False)
    y, h = masked_lowrank_fwd_triton(x, a, b, gate, mask, SCALE, skip_zero_gates=False)
    dx, da, db, dg = masked_lowrank_bwd_triton(grad_y, x, a, b, gate, mask, h, SCALE, True)
    assert y.shape == (0, 16) and dx.shape == (0, 16)
    assert not da.any() and not db.any() and not dg.any()


@pytest.mark.parametrize("with_base", [True, False])
def test_all_zero_gate_reads_no_input(with_base):
    """Every gate zero and no gate gradient: y is the base output (or zeros) and dx, dA, dB are zero without
    x, A, B or dy being read — infinities there would turn into NaN in any product (inf · 0)."""
    x, a, b, gate, mask, grad_y = _inputs(70, 48, 40, 24, torch.float32, 0, with_mask=True)
    x.fill_(float("inf"))
    grad_y.fill_(float("inf"))
    base = torch.randn(70, 40) if with_base else None
    y, h = masked_lowrank_fwd_triton(x, a, b, gate, mask, SCALE, skip_zero_gates=True, base=base)
    assert torch.equal(y, base if with_base else torch.zeros(70, 40)) and not h.any()
    dx, da, db, dg = masked_lowrank_bwd_triton(grad_y, x, a, b, gate, mask, h, SCALE, False)
    assert not dx.any() and not da.any() and not db.any() and not dg.any()
