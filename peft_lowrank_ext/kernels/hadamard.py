"""Batched, unnormalised Walsh–Hadamard transform over the last dimension.

RLoRA's Fastfood projection calls :func:`fwht` and nothing else for the transform, so a faster
implementation (the Triton kernel on CUDA) can replace the pure-PyTorch one behind this single
entry point. The op is registered with ``torch.library.custom_op`` so that ``opcheck`` and
``torch.compile(fullgraph=True)`` see one opaque, differentiable operation. On CUDA it launches
the Triton kernels of ``_triton_hadamard`` (imported lazily: the package never needs Triton).
"""

from __future__ import annotations

import functools

import torch

from ._dispatch import use_triton

# Largest dense Hadamard block used by the CPU path: the transform of length 2^k is done as a few
# small matrix products (Sylvester/Kronecker form) instead of k full passes over memory.
_MAX_BLOCK_LOG2 = 7


def is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@functools.lru_cache(maxsize=64)
def _hadamard_matrix_cpu(log2_n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(log2_n):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Dense Sylvester Hadamard matrix of size ``n`` (entries ±1, natural ordering)."""
    if not is_power_of_two(n):
        raise ValueError(f"hadamard_matrix: n={n} is not allowed; it must be a power of two")
    return _hadamard_matrix_cpu(n.bit_length() - 1).to(device=device, dtype=dtype)


def _block_sizes(log2_n: int) -> list[int]:
    """Split 2^log2_n into near-equal power-of-two factors no larger than 2^_MAX_BLOCK_LOG2."""
    parts = max(1, -(-log2_n // _MAX_BLOCK_LOG2))
    base, extra = divmod(log2_n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def fwht_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Pure-PyTorch ``scale · H x`` (the CPU path and the reference for the kernels).

    ``H_{n1 n2 ...} = H_{n1} ⊗ H_{n2} ⊗ ...``: apply each small factor to the leading axis, then
    rotate that axis to the back, so every factor is one batched matmul. Accumulates in fp32 for
    half-precision inputs, applies ``scale`` in that precision and returns the input dtype.
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht: last dimension {n} is not allowed; it must be a power of two")
    out_dtype = x.dtype
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch_shape = x.shape[:-1]
    y = x.reshape(-1, n).to(compute_dtype)
    rows = y.shape[0]
    if n == 1:
        return x.clone() if scale == 1.0 else (x.to(compute_dtype) * scale).to(out_dtype)
    for log2_m in _block_sizes(n.bit_length() - 1):
        m = 1 << log2_m
        h = hadamard_matrix(m, dtype=compute_dtype, device=y.device)
        y = torch.matmul(h, y.reshape(rows, m, n // m))  # transform the leading axis
        y = y.transpose(1, 2).reshape(rows, n)  # rotate it to the back
    if scale != 1.0:
        y = y * scale  # before the cast: a half output of scale·Hx stays finite when Hx would not
    return y.reshape(*batch_shape, n).to(out_dtype)


@torch.library.custom_op("peft_lowrank_ext::fwht", mutates_args=())
def _fwht_op(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return fwht_reference(x, scale)


@_fwht_op.register_kernel("cuda")
def _(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    if x.shape[-1] < 16 or not use_triton(x):
        return fwht_reference(x, scale)
    from ._triton_hadamard import fwht_triton

    return fwht_triton(x.contiguous(), scale)


@_fwht_op.register_fake
def _(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return torch.empty_like(x)


def _fwht_setup_context(ctx, inputs, output):
    ctx.scale = inputs[1]


def _fwht_backward(ctx, grad: torch.Tensor):
    # scale·H is symmetric, so the vector-Jacobian product is the same scaled transform.
    return _fwht_op(grad.contiguous(), ctx.scale), None


_fwht_op.register_autograd(_fwht_backward, setup_context=_fwht_setup_context)


def fwht(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · H x`` over the last dimension (length a power of two); ``scale=1`` is unnormalised.

    ``scale`` is applied in fp32 before the store, as Dao's ``fast-hadamard-transform`` does: an
    fp16 transform overflows once ``|x|·n`` passes 65504, so normalise with ``scale=n**-0.5``
    rather than dividing afterwards.
    """
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht: last dimension {n} is not allowed; it must be a power of two")
    return _fwht_op(x.contiguous(), float(scale))
