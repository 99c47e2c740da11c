"""Masked / gated low-rank product ``y = base + s · ((x (A ⊙ mask)ᵀ) ⊙ g) Bᵀ``.

This is the one layer under HeteroLoRA (0/1 module switch), AutoLoRA (softmax rank weights) and
PRILoRA (element mask on ``A``): shapes stay fixed and the gate/mask decide what contributes.

Two implementations, chosen per call by ``kernel`` (or ``$PEFT_LOWRANK_EXT_MASKED_KERNEL``):

* ``"aten"`` (what ``"auto"`` picks): the unfused sequence of ATen ops, i.e. cuBLAS on a GPU, with
  the update accumulated into the base output by the second GEMM (``addmm``) wherever that gives
  the same rounding as adding it afterwards. The intermediate is only N×r, so a fused kernel saves
  almost no HBM traffic over this sequence; until a GPU measurement shows a shape where the Triton
  kernel wins, the vendor GEMMs are the path that cannot be slower than cuBLAS.
* ``"triton"``: the custom op below; on CUDA a fused Triton kernel reads ``x`` once, keeps the
  r-wide intermediate in registers, skips ranks whose gate is exactly zero and adds ``base`` in its
  epilogue; elsewhere (and as the reference) plain PyTorch in fp32.
"""

from __future__ import annotations

import os

import torch

from ._dispatch import use_triton

KERNEL_ENV = "PEFT_LOWRANK_EXT_MASKED_KERNEL"
KERNEL_CHOICES = ("auto", "aten", "triton")

# Widest rank the Triton kernels compile for (``_triton_masked_lowrank.rank_config``); wider ranks run the PyTorch path.
MAX_TRITON_RANK = 64


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _effective_a(a: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    a = a.to(dtype)
    return a if mask is None else a * mask.to(dtype)


def masked_lowrank_reference(x, a, b, gate, mask, scale: float,
                             base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch forward: ``(y, h)`` with ``h = x (A ⊙ mask)ᵀ`` kept for the backward pass.

    ``y`` is in x's dtype, or with ``base`` it is ``base + update`` summed in the compute dtype and
    rounded once to base's dtype (what the Triton epilogue does).
    """
    dtype = _compute_dtype(x, a, b, gate)
    h = x.to(dtype) @ _effective_a(a, mask, dtype).T
    y = (h * (gate.to(dtype) * scale)) @ b.to(dtype).T
    if base is not None:
        return (base.to(dtype) + y).to(base.dtype), h
    return y.to(x.dtype), h


def masked_lowrank_backward_reference(grad_y, x, a, b, gate, mask, h, scale: float, gate_grad: bool):
    """Pure-PyTorch gradients ``(dx, dA, dB, dg)``; ``dg`` is zero unless ``gate_grad``."""
    dtype = _compute_dtype(x, a, b, gate)
    dy = grad_y.to(dtype)
    gs = gate.to(dtype) * scale
    dhg = dy @ b.to(dtype)
    dh = dhg * gs
    dx = dh @ _effective_a(a, mask, dtype)
    da = dh.T @ x.to(dtype)
    if mask is not None:
        da = da * mask.to(dtype)
    db = dy.T @ (h.to(dtype) * gs)
    dg = (h.to(dtype) * dhg).sum(0) * scale if gate_grad else torch.zeros_like(gs)
    return dx.to(x.dtype), da.to(a.dtype), db.to(b.dtype), dg.to(gate.dtype)


def _triton_ok(x, a, b, gate) -> bool:
    return b.shape[1] <= MAX_TRITON_RANK and use_triton(x, a, b, gate)


def _contiguous(*tensors):
    return [t if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("peft_lowrank_ext::masked_lowrank", mutates_args=())
def _masked_lowrank_op(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gate: torch.Tensor,
                       mask: torch.Tensor | None, scale: float, skip_zero_gates: bool,
                       base: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # skip_zero_gates only lets the Triton path skip work (then h of zero-gate ranks is left 0).
    return masked_lowrank_reference(x, a, b, gate, mask, scale, base)


@_masked_lowrank_op.register_kernel("cuda")
def _(x, a, b, gate, mask, scale, skip_zero_gates, base=None):
    if not _triton_ok(x, a, b, gate):
        return masked_lowrank_reference(x, a, b, gate, mask, scale, base)
    from ._triton_masked_lowrank import masked_lowrank_fwd_triton

    x, a, b, gate, mask, base = _contiguous(x, a, b, gate, mask, base)
    return masked_lowrank_fwd_triton(x, a, b, gate, mask, scale, skip_zero_gates, base=base)


@_masked_lowrank_op.register_fake
def _(x, a, b, gate, mask, scale, skip_zero_gates, base=None):
    dtype = _compute_dtype(x, a, b, gate)
    y_dtype = x.dtype if base is None else base.dtype
    return x.new_empty((x.shape[0], b.shape[0]), dtype=y_dtype), x.new_empty((x.shape[0], b.shape[1]), dtype=dtype)


@torch.library.custom_op("peft_lowrank_ext::masked_lowrank_backward", mutates_args=())
def _masked_lowrank_backward_op(grad_y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                                gate: torch.Tensor, mask: torch.Tensor | None, h: torch.Tensor, scale: float,
                                gate_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_lowrank_backward_reference(grad_y, x, a, b, gate, mask, h, scale, gate_grad)


@_masked_lowrank_backward_op.register_kernel("cuda")
def _(grad_y, x, a, b, gate, mask, h, scale, gate_grad):
    if not _triton_ok(x, a, b, gate) or h.dtype != torch.float32:
        return masked_lowrank_backward_reference(grad_y, x, a, b, gate, mask, h, scale, gate_grad)
    from ._triton_masked_lowrank import masked_lowrank_bwd_triton

    grad_y, x, a, b, gate, mask, h = _contiguous(grad_y, x, a, b, gate, mask, h)
    return masked_lowrank_bwd_triton(grad_y, x, a, b, gate, mask, h, scale, gate_grad)


@_masked_lowrank_backward_op.register_fake
def _(grad_y, x, a, b, gate, mask, h, scale, gate_grad):
    return torch.empty_like(x), torch.empty_like(a), torch.empty_like(b), torch.empty_like(gate)


def _setup_context(ctx, inputs, output):
    x, a, b, gate, mask, scale, skip_zero_gates, base = inputs
    h = output[1]
    ctx.mark_non_differentiable(h)  # an internal by-product, saved so x is not read again
    ctx.save_for_backward(x, a, b, gate, mask, h)
    ctx.scale, ctx.gate_grad, ctx.has_base = scale, not skip_zero_gates, base is not None


def _backward(ctx, grad_y, _grad_h):
    x, a, b, gate, mask, h = ctx.saved_tensors
    dx, da, db, dg = _masked_lowrank_backward_op(grad_y.contiguous(), x, a, b, gate, mask, h, ctx.scale,
                                                 ctx.gate_grad)
    return dx, da, db, dg if ctx.gate_grad else None, None, None, None, grad_y if ctx.has_base else None


_masked_lowrank_op.register_autograd(_backward, setup_context=_setup_context)


def resolve_kernel(kernel: str | None = None) -> str:
    """``"aten"`` or ``"triton"`` from ``kernel`` or, when it is None, ``$PEFT_LOWRANK_EXT_MASKED_KERNEL``."""
    choice = os.environ.get(KERNEL_ENV, "auto") if kernel is None else kernel
    if choice not in KERNEL_CHOICES:
        source = f"${KERNEL_ENV}" if kernel is None else "kernel"
        raise ValueError(f"masked_lowrank: {source}={choice!r} is not allowed; use one of "
                         f"{', '.join(KERNEL_CHOICES)}")
    return "aten" if choice == "auto" else choice


def _addmm_is_exact(base: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``addmm(base, hg, Bᵀ)`` rounds like ``base + (hg Bᵀ).to(base.dtype)``: the product is
    computed in base's dtype anyway (autocast to it, or no cast at all)."""
    device = base.device.type
    if torch.is_autocast_enabled(device):
        return base.dtype == torch.get_autocast_dtype(device)
    return base.dtype == dtype


def _aten_lowrank(x, a, b, gate, mask, scale: float, base: torch.Tensor | None) -> torch.Tensor:
    """The unfused ATen sequence (cuBLAS on a GPU); plain autograd ops, so twice differentiable. The scale
    (and gate) multiply the N×r intermediate, not the N×d_out output: no extra pass over the output."""
    dtype = _compute_dtype(x, a, b) if gate is None else _compute_dtype(x, a, b, gate)
    h = x.to(dtype) @ _effective_a(a, mask, dtype).T
    hg = h * scale if gate is None else h * (gate.to(dtype) * scale)
    b_t = b.to(dtype).T
    if base is None:
        return (hg @ b_t).to(x.dtype)
    if _addmm_is_exact(base, dtype):
        return torch.addmm(base, hg, b_t)  # the update accumulated by the GEMM: no separate add pass
    return base + (hg @ b_t).to(base.dtype)


def masked_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gate: torch.Tensor | None, scale: float,
                   mask: torch.Tensor | None = None, *, base: torch.Tensor | None = None,
                   kernel: str | None = None) -> torch.Tensor:
    """``scale · ((x (A ⊙ mask)ᵀ) ⊙ gate) Bᵀ`` over the last dimension of ``x`` (plus ``base``).

    ``x`` (..., d_in), ``A`` (r, d_in), ``B`` (d_out, r), ``gate`` (r,) or None (all ones: plain LoRA's
    ``scale · x Aᵀ Bᵀ``, as RLoRA uses it), optional 0/1 ``mask``
    shaped like ``A`` (no gradient). Returns (..., d_out) in x's dtype, computed with fp32
    accumulation; with ``base`` (..., d_out) it returns ``base + update`` in base's dtype, the
    update accumulated into it by the product (a layer's base output: no separate add).
    ``kernel``: ``"auto"`` (the default, from ``$PEFT_LOWRANK_EXT_MASKED_KERNEL`` when unset) and
    ``"aten"`` run the unfused ATen/cuBLAS sequence; ``"triton"`` the fused kernel on CUDA, which
    also skips ranks with a zero gate whenever the gate needs no gradient.
    """
    r, d_in = A.shape
    d_out = B.shape[0]
    if x.shape[-1] != d_in or B.shape[1] != r or (gate is not None and gate.shape != (r,)):
        raise ValueError(f"masked_lowrank: shapes x{tuple(x.shape)} A{tuple(A.shape)} B{tuple(B.shape)} "
                         f"gate{None if gate is None else tuple(gate.shape)} do not fit y = s·((x Aᵀ) ⊙ g) Bᵀ")
    if mask is not None and mask.shape != A.shape:
        raise ValueError(f"masked_lowrank: mask{tuple(mask.shape)} must have A's shape {tuple(A.shape)}")
    out_shape = (*x.shape[:-1], d_out)
    if base is not None and tuple(base.shape) != out_shape:
        raise ValueError(f"masked_lowrank: base{tuple(base.shape)} must have the output's shape {out_shape}")
    x2d = x.reshape(-1, d_in)
    base2d = None if base is None else base.reshape(-1, d_out)
    if resolve_kernel(kernel) == "aten":
        return _aten_lowrank(x2d, A, B, gate, mask, float(scale), base2d).reshape(out_shape)
    if gate is None:
        gate = torch.ones(r, device=A.device, dtype=A.dtype)
    skip = not (torch.is_grad_enabled() and gate.requires_grad)
    y, _ = _masked_lowrank_op(x2d.contiguous(), A.contiguous(), B.contiguous(), gate.contiguous(),
                              None if mask is None else mask.contiguous(), float(scale), skip,
                              None if base2d is None else base2d.contiguous())
    return y.reshape(out_shape)
