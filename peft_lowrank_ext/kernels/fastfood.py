"""Fastfood projection ``θ = P z`` used by RLoRA, as a differentiable custom op.

``P z = (1 / (‖g‖ √out_dim)) · [H · diag(g) · Π · H · diag(b) · pad_L(z)][:out_dim]``
(Le, Sarlós, Smola 2013; used for intrinsic-dimension training by Aghajanyan et al. 2021), with
``H`` the unnormalised Walsh–Hadamard transform of size ``L``, ``b`` ±1 signs, ``(Π v)_i =
v[perm[i]]`` and ``g`` Gaussian. ``P`` is never stored; its transpose is the same chain reversed,
so the backward pass costs two more transforms. Rows are modules: every module with the same
``L`` goes through one launch. On CUDA the chain runs as four fused Triton passes
(``_triton_fastfood``); elsewhere it is PyTorch around :func:`fwht`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import use_triton
from .hadamard import fwht, is_power_of_two


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _row_scale(gauss: torch.Tensor, out_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The normalisation ``1 / (‖g_m‖ √out_dim)`` per module."""
    return torch.linalg.vector_norm(gauss, dim=-1, dtype=dtype).mul_(math.sqrt(out_dim)).reciprocal_()


def fastfood_reference(z: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor,
                       gauss: torch.Tensor, out_dim: int) -> torch.Tensor:
    """Pure-PyTorch forward (the CPU path and the reference for the Triton kernels)."""
    dtype = _compute_dtype(z)
    length = signs.shape[-1]
    u = fwht(F.pad(z.to(dtype), (0, length - z.shape[-1])) * signs.to(dtype))
    v = fwht(torch.gather(u, 1, perm.long()) * gauss.to(dtype))[:, :out_dim]
    return v * _row_scale(gauss, out_dim, dtype)[:, None]


def fastfood_backward_reference(grad: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor,
                                gauss: torch.Tensor, d: int) -> torch.Tensor:
    """Pure-PyTorch ``Pᵀ grad``: pad, H, × g, inverse permutation (scatter), H, × b, truncate."""
    dtype = _compute_dtype(grad)
    length = signs.shape[-1]
    t = F.pad(grad.to(dtype) * _row_scale(gauss, grad.shape[-1], dtype)[:, None], (0, length - grad.shape[-1]))
    u = fwht(t) * gauss.to(dtype)
    s = torch.empty_like(u).scatter_(1, perm.long(), u)
    return fwht(s)[:, :d] * signs[:, :d].to(dtype)


def _kernel_perm(perm: torch.Tensor) -> torch.Tensor:
    """The kernels read int32 indices (L <= 2^30): half the index traffic of int64. No copy if already int32."""
    return perm if perm.dtype == torch.int32 else perm.to(torch.int32)


def validate_perm(perm: torch.Tensor, rows: int, length: int, what: str = "fastfood_project") -> None:
    """Raise ``ValueError`` unless ``perm`` is an integer (rows, length) tensor whose every row is a
    permutation of ``0 .. length-1``.

    The kernels gather/scatter through ``perm`` without bounds checks, so an out-of-range value is an
    out-of-bounds memory access on the GPU. The check reads the values: on a CUDA tensor it costs
    one host sync, so callers that reuse a perm validate it once where it is built or cached
    (:class:`StackedFastfood`, RLoRA's per-device factor cache) and then skip it per call.
    """
    if perm.dtype == torch.bool or perm.dtype.is_floating_point or perm.dtype.is_complex:
        raise ValueError(f"{what}: perm must be an integer tensor (int64 or int32), got {perm.dtype}")
    if perm.dim() != 2 or tuple(perm.shape) != (rows, length):
        raise ValueError(f"{what}: perm must have shape ({rows}, {length}) (one row per module, L={length}), "
                         f"got {tuple(perm.shape)}")
    if perm.numel() == 0 or torch.compiler.is_compiling():
        return  # values are data-dependent: checked in eager (validate the perm before compiling)
    lo, hi = torch.aminmax(perm)
    lo, hi = int(lo), int(hi)  # the one sync on CUDA
    if lo < 0 or hi >= length:
        raise ValueError(f"{what}: perm values must lie in [0, {length - 1}] (each row a permutation of "
                         f"0..L-1, L={length}); got values in [{lo}, {hi}]")
    counts = torch.zeros(rows, length, dtype=torch.int32, device=perm.device)
    counts.scatter_add_(1, perm.long(), torch.ones_like(counts))
    bad_rows = (counts != 1).any(1).nonzero().flatten()
    if bad_rows.numel():
        raise ValueError(f"{what}: every row of perm must be a permutation of 0..{length - 1} (no repeated "
                         f"value); row {int(bad_rows[0])} repeats a value")


@torch.library.custom_op("peft_lowrank_ext::fastfood_project", mutates_args=())
def _fastfood_op(z: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor, gauss: torch.Tensor,
                 out_dim: int) -> torch.Tensor:
    return fastfood_reference(z, signs, perm, gauss, out_dim)


@_fastfood_op.register_kernel("cuda")
def _(z, signs, perm, gauss, out_dim):
    if not use_triton(z, signs, gauss) or signs.shape[-1] < 16:
        return fastfood_reference(z, signs, perm, gauss, out_dim)
    from ._triton_fastfood import fastfood_forward_triton

    z, signs, perm, gauss = (t.contiguous() for t in (z, signs, _kernel_perm(perm), gauss))
    return fastfood_forward_triton(z, signs, perm, gauss, _row_scale(gauss, out_dim, torch.float32), out_dim)


@_fastfood_op.register_fake
def _(z, signs, perm, gauss, out_dim):
    return z.new_empty((z.shape[0], out_dim), dtype=_compute_dtype(z))


@torch.library.custom_op("peft_lowrank_ext::fastfood_project_backward", mutates_args=())
def _fastfood_backward_op(grad: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor,
                          gauss: torch.Tensor, d: int) -> torch.Tensor:
    return fastfood_backward_reference(grad, signs, perm, gauss, d)


@_fastfood_backward_op.register_kernel("cuda")
def _(grad, signs, perm, gauss, d):
    if not use_triton(grad, signs, gauss) or signs.shape[-1] < 16:
        return fastfood_backward_reference(grad, signs, perm, gauss, d)
    from ._triton_fastfood import fastfood_backward_triton

    grad, signs, perm, gauss = (t.contiguous() for t in (grad, signs, _kernel_perm(perm), gauss))
    return fastfood_backward_triton(grad, signs, perm, gauss, _row_scale(gauss, grad.shape[-1], torch.float32), d)


@_fastfood_backward_op.register_fake
def _(grad, signs, perm, gauss, d):
    return grad.new_empty((grad.shape[0], d), dtype=_compute_dtype(grad))


def _setup_context(ctx, inputs, output):
    z, signs, perm, gauss, _ = inputs
    ctx.save_for_backward(signs, perm, gauss)
    ctx.d, ctx.z_dtype = z.shape[1], z.dtype


def _backward(ctx, grad):
    signs, perm, gauss = ctx.saved_tensors
    grad_z = _fastfood_backward_op(grad.contiguous(), signs, perm, gauss, ctx.d)
    return grad_z.to(ctx.z_dtype), None, None, None, None


_fastfood_op.register_autograd(_backward, setup_context=_setup_context)


def _check(z, signs, perm, gauss, out_dim, check_perm: bool = True):
    if z.dim() != 2 or signs.dim() != 2:
        raise ValueError("fastfood_project: z must be (M, d) and signs, perm, gauss (M, L)")
    (rows, d), length = z.shape, signs.shape[-1]
    if not (signs.shape == perm.shape == gauss.shape == (rows, length)):
        raise ValueError(f"fastfood_project: signs, perm and gauss must all be ({rows}, L)")
    if not is_power_of_two(length) or length < max(d, out_dim):
        raise ValueError(f"fastfood_project: L={length} must be a power of two >= max(d={d}, out_dim={out_dim})")
    if check_perm:
        validate_perm(perm, rows, length)
    elif perm.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fastfood_project: perm must be int64 or int32, got {perm.dtype}")


def fastfood_project(z: torch.Tensor, signs: torch.Tensor, perm: torch.Tensor, gauss: torch.Tensor,
                     out_dim: int, *, check_perm: bool = True) -> torch.Tensor:
    """Batched Fastfood projection of z (M, d) to (M, out_dim), fp32 (fp64 for fp64 z).

    ``signs`` (±1), ``perm`` (int64 or int32, each row a permutation of ``range(L)``) and ``gauss``
    are (M, L) with ``L`` a power of two ``>= max(d, out_dim)``. Differentiable in ``z`` only.
    ``perm`` is validated (:func:`validate_perm`: one host sync for a CUDA perm) unless
    ``check_perm=False``, for a perm already validated where it was built or cached.
    """
    _check(z, signs, perm, gauss, out_dim, check_perm)
    return _fastfood_op(z.contiguous(), signs.contiguous(), perm.contiguous(), gauss.contiguous(), int(out_dim))


class FastfoodInput(NamedTuple):
    """One module's projection: ``z`` (d,), factors (L,), output length ``out_dim``."""

    z: torch.Tensor
    signs: torch.Tensor
    perm: torch.Tensor
    gauss: torch.Tensor
    out_dim: int


class StackedFastfood:
    """The factors of a fixed set of modules sharing one ``L``, stacked once and reused every step.

    Stacking signs/perm/gauss costs more memory traffic than the transforms themselves at 7B
    shapes, so callers that project the same modules every step keep one of these per group.
    ``z`` rows are zero-padded to the longest ``d`` (``pad_L(z)`` is unchanged) and projected to the
    longest ``out_dim``; each slice is rescaled from ``1/√max_out`` to its own ``1/√out_dim``.
    """

    def __init__(self, signs: Sequence[torch.Tensor], perm: Sequence[torch.Tensor], gauss: Sequence[torch.Tensor],
                 out_dims: Sequence[int]):
        self.signs, self.perm, self.gauss = torch.stack(list(signs)), torch.stack(list(perm)), torch.stack(list(gauss))
        validate_perm(self.perm, *self.signs.shape, what="StackedFastfood")  # once, not per step
        if self.perm.is_cuda:
            self.perm = _kernel_perm(self.perm)  # the kernels' int32 indices, converted once
        self.out_dims = list(out_dims)
        self.out_max = max(self.out_dims)

    def project(self, zs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        d_max = max(z.shape[-1] for z in zs)
        theta = fastfood_project(torch.stack([F.pad(z, (0, d_max - z.shape[-1])) for z in zs]),
                                 self.signs, self.perm, self.gauss, self.out_max, check_perm=False)
        return [theta[row, :out] if out == self.out_max else theta[row, :out] * math.sqrt(self.out_max / out)
                for row, out in enumerate(self.out_dims)]


def fastfood_project_grouped(inputs: Sequence[FastfoodInput]) -> list[torch.Tensor]:
    """Project many modules with one launch chain per distinct ``L`` (and device).

    Returns one (out_dim,) tensor per input, in order. For repeated calls over the same modules
    keep a :class:`StackedFastfood` per group instead (no per-call stacking).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, item in enumerate(inputs):
        groups[(item.signs.shape[-1], item.z.device)].append(i)
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for members in groups.values():
        items = [inputs[i] for i in members]
        stacked = StackedFastfood([it.signs for it in items], [it.perm for it in items], [it.gauss for it in items],
                                  [it.out_dim for it in items])
        for i, vec in zip(members, stacked.project([it.z for it in items])):
            out[i] = vec
    return out
