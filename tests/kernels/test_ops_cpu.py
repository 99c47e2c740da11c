"""The custom ops on CPU: references against dense float64 maths, autograd, opcheck, torch.compile."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from aten_ops import aten_ops
from _kernel_checks import TOLERANCE, assert_close, random_fastfood_factors

from peft_lowrank_ext.kernels import (
    FastfoodInput,
    fastfood_project,
    fastfood_project_grouped,
    fwht,
    hadamard_matrix,
    masked_lowrank,
)
from peft_lowrank_ext.kernels.fastfood import StackedFastfood, _fastfood_backward_op, _fastfood_op, validate_perm
from peft_lowrank_ext.kernels.hadamard import _fwht_op
from peft_lowrank_ext.kernels.masked_lowrank import _masked_lowrank_backward_op, _masked_lowrank_op

ROOT = Path(__file__).resolve().parents[2]


def _dense_fastfood(signs, perm, gauss, d, out_dim):
    """P (out_dim, d) of one module, built explicitly in float64."""
    length = signs.numel()
    h = hadamard_matrix(length, torch.float64)
    permutation = torch.eye(length, dtype=torch.float64)[perm]  # (Π v)_i = v[perm[i]]
    chain = h @ torch.diag(gauss.double()) @ permutation @ h @ torch.diag(signs.double())
    return chain[:out_dim, :d] / (gauss.double().norm() * math.sqrt(out_dim))


def _masked_inputs(n=9, d_in=12, d_out=10, r=5, dtype=torch.float64, gate_grad=True, with_mask=True):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype, requires_grad=True)
    a = torch.randn(r, d_in, generator=gen, dtype=dtype, requires_grad=True)
    b = torch.randn(d_out, r, generator=gen, dtype=dtype, requires_grad=True)
    gate = torch.tensor([0.5, 0.0, 1.5, 0.25, 0.0][:r], dtype=dtype).requires_grad_(gate_grad)
    mask = (torch.rand(r, d_in, generator=gen) > 0.4).to(dtype) if with_mask else None
    return x, a, b, gate, mask


# ----------------------------------------------------------------------------------------------
# Walsh–Hadamard


@pytest.mark.parametrize("n", [1, 2, 16, 128, 1024])
def test_fwht_matches_dense_hadamard(n):
    x = torch.randn(3, 2, n, dtype=torch.float64)
    assert_close(fwht(x), x @ hadamard_matrix(n, torch.float64))


def _overflowing_half(rows: int, n: int) -> torch.Tensor:
    """fp16 rows whose unnormalised transform passes 65504 (|x| ~ 4, n >= 2^15: H x[0] ~ 4n)."""
    gen = torch.Generator().manual_seed(n)
    return (4.0 + 0.5 * torch.randn(rows, n, generator=gen)).to(torch.float16)


def test_fwht_scale_keeps_half_precision_finite():
    n = 1 << 15
    x = _overflowing_half(3, n)
    assert torch.isinf(fwht(x)).any()  # the unnormalised fp16 transform overflows
    out = fwht(x, scale=n ** -0.5)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_close(out, fwht(x.double()) * n ** -0.5, torch.float16)


@pytest.mark.parametrize("scale", [1.0, 0.125, -3.0])
def test_fwht_scale_matches_dense_and_gradcheck(scale):
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert_close(fwht(x, scale), scale * (x @ hadamard_matrix(64, torch.float64)))
    assert torch.autograd.gradcheck(lambda v: fwht(v, scale), (x,))
    assert torch.equal(fwht(x.detach()), fwht(x.detach(), 1.0))  # the default is today's transform


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.randn(3, 12))


# ----------------------------------------------------------------------------------------------
# Fastfood


@pytest.mark.parametrize("d,out_dim,length", [(5, 16, 16), (10, 50, 64), (64, 64, 64), (1, 7, 8)])
def test_fastfood_matches_dense_projection(d, out_dim, length):
    signs, perm, gauss = random_fastfood_factors(3, length, torch.Generator().manual_seed(d))
    z = torch.randn(3, d, dtype=torch.float64)
    grad = torch.randn(3, out_dim, dtype=torch.float64)
    theta = fastfood_project(z, signs, perm, gauss, out_dim)
    for m in range(3):
        p = _dense_fastfood(signs[m], perm[m], gauss[m], d, out_dim)
        assert_close(theta[m], p @ z[m])
        assert_close(_fastfood_backward_op(grad, signs, perm, gauss, d)[m], p.T @ grad[m])


def test_fastfood_output_is_fp32_and_gradient_has_z_dtype():
    signs, perm, gauss = random_fastfood_factors(2, 32)
    z = torch.randn(2, 9, dtype=torch.bfloat16, requires_grad=True)
    theta = fastfood_project(z, signs, perm, gauss, 20)
    theta.sum().backward()
    assert theta.dtype == torch.float32 and z.grad.dtype == torch.bfloat16


def test_fastfood_gradcheck():
    signs, perm, gauss = random_fastfood_factors(2, 32)
    z = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: fastfood_project(v, signs, perm, gauss, 25), (z,))


def test_fastfood_grouped_matches_per_module_calls():
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 30, 32), (8, 64, 64), (3, 20, 32), (16, 60, 64), (2, 9, 16)]  # (d, out_dim, L)
    items = []
    for d, out_dim, length in shapes:
        signs, perm, gauss = random_fastfood_factors(1, length, gen)
        z = torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True)
        items.append(FastfoodInput(z, signs[0], perm[0], gauss[0], out_dim))
    grouped = fastfood_project_grouped(items)
    sum(t.square().sum() for t in grouped).backward()
    for item, theta in zip(items, grouped):
        z = item.z.detach().requires_grad_()
        single = fastfood_project(z[None], item.signs[None], item.perm[None], item.gauss[None], item.out_dim)[0]
        single.square().sum().backward()
        assert_close(theta, single)
        assert_close(item.z.grad, z.grad)


def test_fastfood_validates_shapes():
    signs, perm, gauss = random_fastfood_factors(2, 16)
    with pytest.raises(ValueError, match="power of two"):
        fastfood_project(torch.randn(2, 20), signs, perm, gauss, 10)
    with pytest.raises(ValueError, match="integer"):
        fastfood_project(torch.randn(2, 4), signs, perm.float(), gauss, 10)


def test_fastfood_accepts_int32_perm():
    signs, perm, gauss = random_fastfood_factors(2, 32)
    z = torch.randn(2, 9, dtype=torch.float64)
    assert_close(fastfood_project(z, signs, perm.int(), gauss, 20), fastfood_project(z, signs, perm, gauss, 20))


@pytest.mark.parametrize("corrupt,match", [
    (lambda p: p.index_fill(1, torch.tensor([3]), 16), r"\[0, 15\].*got values in \[0, 16\]"),
    (lambda p: p.index_fill(1, torch.tensor([0]), -1), r"\[0, 15\].*got values in \[-1, 15\]"),
    (lambda p: torch.cat([p[:1], p[1:].index_fill(1, torch.tensor([0, 1]), 5)]), "row 1 repeats"),
    (lambda p: p.float(), "integer"),
    (lambda p: p[:, :8], r"shape \(2, 16\)|must all be \(2, L\)"),
])
def test_fastfood_rejects_invalid_perm(corrupt, match):
    """An out-of-range perm would be an out-of-bounds gather/scatter on the GPU: ValueError instead."""
    signs, perm, gauss = random_fastfood_factors(2, 16)
    bad = corrupt(perm)
    with pytest.raises(ValueError, match="perm") as info:
        fastfood_project(torch.randn(2, 4), signs, bad, gauss, 10)
    assert info.match(match)
    with pytest.raises(ValueError, match="StackedFastfood"):
        StackedFastfood(list(signs), list(bad), list(gauss), [10, 10])
    validate_perm(perm, 2, 16)  # the valid one passes


def test_stacked_fastfood_validates_once_not_per_call(monkeypatch):
    import peft_lowrank_ext.kernels.fastfood as ff

    signs, perm, gauss = random_fastfood_factors(2, 16)
    calls = []
    monkeypatch.setattr(ff, "validate_perm", lambda *a, **k: calls.append(a))
    stacked = StackedFastfood(list(signs), list(perm), list(gauss), [10, 12])
    for _ in range(3):
        stacked.project([torch.randn(4), torch.randn(3)])
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------------
# Masked / gated low-rank product


def _unfused(x, a, b, gate, scale, mask):
    a = a if mask is None else a * mask
    return scale * ((x @ a.T) * gate) @ b.T


KERNELS = ["aten", "triton"]  # on CPU "triton" runs the custom op's PyTorch reference


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("gate_grad", [True, False])
def test_masked_lowrank_matches_unfused_autograd(with_mask, gate_grad, with_base, kernel):
    inputs = _masked_inputs(gate_grad=gate_grad, with_mask=with_mask)
    x, a, b, gate, mask = inputs
    base = torch.randn(9, 10, dtype=torch.float64, requires_grad=True) if with_base else None
    grad = torch.randn(9, 10, dtype=torch.float64)
    y = masked_lowrank(x, a, b, gate, 0.75, mask, base=base, kernel=kernel)
    wrt = [t for t in (x, a, b, gate, base) if t is not None and t.requires_grad]
    got = torch.autograd.grad(y, wrt, grad)
    y_ref = _unfused(x, a, b, gate, 0.75, mask) + (0 if base is None else base)
    ref = torch.autograd.grad(y_ref, wrt, grad)
    assert_close(y, y_ref)
    for g, r in zip(got, ref):
        assert_close(g, r)


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_lowrank_gradcheck(kernel):
    x, a, b, gate, mask = _masked_inputs(n=4, d_in=5, d_out=3, r=5)
    base = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: masked_lowrank(*t[:4], 1.3, mask, base=t[4], kernel=kernel)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a, b, gate, base))


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_lowrank_flattens_leading_dims_and_keeps_dtype(kernel):
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    a, b, gate = torch.randn(4, 16), torch.randn(8, 4), torch.ones(4)
    y = masked_lowrank(x, a, b, gate, 2.0, kernel=kernel)
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16
    assert_close(y, _unfused(x.double(), a.double(), b.double(), gate.double(), 2.0, None), torch.bfloat16)
    base = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    y = masked_lowrank(x.float(), a, b, gate, 2.0, base=base, kernel=kernel)  # a fp32 adapter on a bf16 base
    assert y.shape == (2, 3, 8) and y.dtype == torch.bfloat16
    want = base.double() + _unfused(x.double(), a.double(), b.double(), gate.double(), 2.0, None)
    assert_close(y, want, torch.bfloat16)


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_lowrank_without_gate_is_plain_lora(kernel):
    """``gate=None`` (RLoRA's product): ``scale · x Aᵀ Bᵀ``, gradients included."""
    x, a, b, _, _ = _masked_inputs()
    base = torch.randn(9, 10, dtype=torch.float64)
    y = masked_lowrank(x, a, b, None, 0.75, base=base, kernel=kernel)
    want = base + 0.75 * (x @ a.T) @ b.T
    assert_close(y, want)
    for got, ref in zip(torch.autograd.grad(y.sum(), (x, a, b)), torch.autograd.grad(want.sum(), (x, a, b))):
        assert_close(got, ref)


def test_masked_lowrank_accumulates_into_base_with_one_gemm_when_exact():
    """The update goes into the base output through ``addmm`` (no separate add) when the product is computed
    in base's dtype anyway (same dtype, or autocast to it); otherwise it is rounded and added as PEFT does."""
    x, a, b, gate, mask = (t.detach().float() if t is not None else None for t in _masked_inputs())
    base = torch.randn(9, 10)
    ops = aten_ops(lambda: masked_lowrank(x, a, b, gate, 0.5, mask, base=base))
    assert ops.count("addmm") == 1 and "add" not in ops, ops
    ops = aten_ops(lambda: masked_lowrank(x, a, b, gate, 0.5, mask, base=base.bfloat16()))
    assert "addmm" not in ops and "add" in ops, ops  # fp32 product, bf16 base: round, then add
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = masked_lowrank(x, a, b, gate, 0.5, mask, base=base.bfloat16())
        ops = aten_ops(lambda: masked_lowrank(x, a, b, gate, 0.5, mask, base=base.bfloat16()))
    assert ops.count("addmm") == 1 and "add" not in ops, ops
    assert y.dtype == torch.bfloat16
    assert_close(y, base.double() + _unfused(x.double(), a.double(), b.double(), gate.double(), 0.5, mask.double()),
                 torch.bfloat16)


def test_masked_lowrank_kernel_choice(monkeypatch):
    """``kernel=`` wins over ``$PEFT_LOWRANK_EXT_MASKED_KERNEL``; "auto" is the ATen path; bad names say what is allowed."""
    from peft_lowrank_ext.kernels.masked_lowrank import KERNEL_ENV, resolve_kernel

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert resolve_kernel() == "aten" and resolve_kernel("auto") == "aten" and resolve_kernel("triton") == "triton"
    monkeypatch.setenv(KERNEL_ENV, "triton")
    assert resolve_kernel() == "triton" and resolve_kernel("aten") == "aten"
    x, a, b, gate, mask = (t.detach().float() if t is not None else None for t in _masked_inputs())
    assert "masked_lowrank" in aten_ops(lambda: masked_lowrank(x, a, b, gate, 0.5, mask))  # the custom op
    monkeypatch.setenv(KERNEL_ENV, "cutlass")
    with pytest.raises(ValueError, match=r"\$PEFT_LOWRANK_EXT_MASKED_KERNEL='cutlass' is not allowed; use one of "
                                         r"auto, aten, triton"):
        masked_lowrank(x, a, b, gate, 0.5)
    with pytest.raises(ValueError, match="kernel='fast' is not allowed"):
        masked_lowrank(x, a, b, gate, 0.5, kernel="fast")


def test_masked_lowrank_validates_shapes():
    with pytest.raises(ValueError, match="do not fit"):
        masked_lowrank(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5, 3), torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="mask"):
        masked_lowrank(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5, 4), torch.ones(4), 1.0, torch.ones(4, 7))
    with pytest.raises(ValueError, match=r"base\(3, 4\) must have the output's shape \(3, 5\)"):
        masked_lowrank(torch.randn(3, 8), torch.randn(4, 8), torch.randn(5, 4), torch.ones(4), 1.0,
                       base=torch.randn(3, 4))


# ----------------------------------------------------------------------------------------------
# opcheck and torch.compile


def _opcheck_cases():
    signs, perm, gauss = random_fastfood_factors(3, 64)
    x, a, b, gate, mask = (t.detach().float() if t is not None else None for t in _masked_inputs())
    h = x @ (a * mask).T
    backward_args = (torch.randn(9, 10), x.clone(), a.clone(), b.clone(), gate.clone(), mask, h, 0.5, True)
    cases = {
        "fwht": (_fwht_op, (torch.randn(4, 32, requires_grad=True),)),
        "fwht_scaled": (_fwht_op, (torch.randn(4, 32, requires_grad=True), 0.25)),
        "fastfood_int32_perm": (_fastfood_op, (torch.randn(3, 10, requires_grad=True), signs, perm.int(), gauss, 50)),
        "fastfood": (_fastfood_op, (torch.randn(3, 10, requires_grad=True), signs, perm, gauss, 50)),
        "fastfood_backward": (_fastfood_backward_op, (torch.randn(3, 50), signs, perm, gauss, 10)),
        "masked_lowrank": (_masked_lowrank_op, (x.requires_grad_(), a.requires_grad_(), b.requires_grad_(),
                                                gate.requires_grad_(), mask, 0.5, False)),
        "masked_lowrank_no_mask": (_masked_lowrank_op, (x, a, b, gate.detach(), None, 0.5, True)),
        "masked_lowrank_base": (_masked_lowrank_op, (x, a, b, gate.detach(), mask, 0.5, True,
                                                     torch.randn(9, 10, requires_grad=True))),
        "masked_lowrank_backward": (_masked_lowrank_backward_op, backward_args),
    }
    return [pytest.param(op, args, id=name) for name, (op, args) in cases.items()]


@pytest.mark.parametrize("op,args", _opcheck_cases())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("kernel", KERNELS + [None])  # None: read from the environment inside the graph
def test_torch_compile_fullgraph_forward_and_backward(kernel):
    torch._dynamo.reset()
    signs, perm, gauss = random_fastfood_factors(3, 64)
    x, a, b, gate, mask = (t.detach().float() if t is not None else None for t in _masked_inputs())
    z = torch.randn(3, 10)

    def loss(x, a, b, gate, z):
        y = masked_lowrank(x, a, b, gate, 0.5, mask, base=x[:, :10], kernel=kernel)
        theta = fastfood_project(z, signs, perm, gauss, 50)
        return y.square().mean() + theta.square().sum() + fwht(x[:, :8]).square().mean()

    leaves = [t.clone().requires_grad_() for t in (x, a, b, gate, z)]
    eager = loss(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(loss, fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in (x, a, b, gate, z)]
    got = compiled(*leaves_c)
    got_grads = torch.autograd.grad(got, leaves_c)
    assert_close(got, eager)
    for g, r in zip(got_grads, eager_grads):
        assert_close(g, r)


# ----------------------------------------------------------------------------------------------
# Packaging


def test_import_and_cpu_use_without_triton():
    """``import peft_lowrank_ext.kernels`` must not need Triton (nor touch CUDA)."""
    script = textwrap.dedent("""
        import importlib.abc, sys
        class NoTriton(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("triton is blocked for this test")
        sys.meta_path.insert(0, NoTriton())
        import torch
        import peft_lowrank_ext.kernels as k
        from peft_lowrank_ext.kernels._dispatch import triton_available
        assert not triton_available() and "triton" not in sys.modules
        assert not torch.cuda.is_initialized()
        y = k.masked_lowrank(torch.randn(3, 8), torch.randn(2, 8), torch.randn(4, 2), torch.ones(2), 1.0)
        assert y.shape == (3, 4) and k.fwht(torch.randn(2, 16)).shape == (2, 16)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
