"""Triton kernels for the batched Walsh–Hadamard transform (and the Fastfood chain built on it).

One generic *pass* kernel transforms a chunk of ``LOG2_M`` index bits of every row: it views the
row of length ``L`` as ``(L / (M·S), M, S)`` and applies ``H_M`` along the middle axis. The
contiguous pass (``S == 1``) puts ``C`` consecutive length-``M`` lines in one program, so small
``n`` still gives every program a full tile; a strided pass takes ``C`` neighbouring columns so
its loads stay coalesced. ``H_{n1·n2} = H_{n1} ⊗ H_{n2}``, so a contiguous pass followed by
strided passes over the remaining bits is the whole transform.

Inside a program ``H_M`` is a product of 16×16 Kronecker factors applied with ``tl.dot``
(tensor cores, a few layout changes) rather than ``log2 M`` register butterflies. fp32 data goes
through the dot as two tf32 terms (fp32 accuracy); fp16/bf16 data as native half operands with fp32
accumulation (each 16-point stage rounds its input to the data's dtype once, as a half workspace
would), which halves the shared-memory staging and lets one program hold up to 2^15 values, so
half-precision transforms up to 2^15 are a single pass. Optional prologue/epilogue steps (sign flip,
gather, scaling, scatter, truncation) let Fastfood fuse its elementwise work into the first and
last pass; the output scale is applied in the first pass, so fp16 intermediates never exceed the
output's own bound.

This module imports Triton; the op modules import it lazily so the package works without it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MIN_LOG2 = 4  # the smallest Kronecker factor tl.dot accepts is 16
MAX_CONTIG_LOG2 = 13  # largest length one program transforms in fp32 (8192 values)
MAX_CONTIG_LOG2_HALF = 15  # ... with half-precision dot operands (32768 values, 16 warps)
MAX_STRIDED_LOG2 = 9  # strided passes keep >= 16 neighbouring columns per program
MAX_LOG2 = 30  # tile offsets are int32 (row offsets are int64)
NUM_WARPS = 8  # 4 warps need ~180 registers per thread for a 4096-value fp32 tile
WIDE_NUM_WARPS = 16  # tiles of 2^14 and 2^15 values (half precision only)

# How a pass feeds tl.dot (a constexpr): tf32; fp32 split into two tf32 terms; native half operands;
# the same rounding emulated in fp32 (the interpreter multiplies raw bf16 bit patterns).
DOT_TF32, DOT_SPLIT, DOT_HALF, DOT_HALF_EMULATED = 0, 1, 2, 3


def max_registers(log2_m: int, strided: bool, dot: int) -> int | None:
    """The launch's ``maxnreg``: None (ptxas decides) except for strided split-tf32 passes of 2^5-point
    lines, where ptxas alone stops at 64 registers and spills (16 bytes on sm_90 with a fused row scale at
    S = 2^18) and caps of 96 or 128 spill at other strides; with 168 all 25 such configs compile without
    spills (68–132 registers). bench/sm90_report.py compiles every config with the cap it launches with."""
    return 168 if strided and dot == DOT_SPLIT and log2_m <= 5 else None


@triton.jit
def _hadamard_tile(BITS: tl.constexpr):
    """16×16 matrix ``H_{2^BITS} ⊗ I_{16 / 2^BITS}``: it transforms the top BITS of 4 index bits."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    low_bits: tl.constexpr = 4 - BITS
    v = (i >> low_bits) & (j >> low_bits)
    parity = (v ^ (v >> 1) ^ (v >> 2) ^ (v >> 3)) & 1
    h = 1.0 - 2.0 * parity.to(tl.float32)
    if BITS < 4:
        low_mask: tl.constexpr = (1 << low_bits) - 1
        h = tl.where((i & low_mask) == (j & low_mask), h, 0.0)
    return h


@triton.jit
def _round_to(x, HALF: tl.constexpr):
    """fp32 ``x`` rounded to the nearest ``HALF`` (fp16/bf16) value, kept in fp32 (the interpreter's
    own fp32 -> bf16 cast truncates, so bf16 is rounded on the bits: round half to even)."""
    if HALF == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True)
    return x.to(HALF).to(tl.float32)


@triton.jit
def _dot_h(h, x, DOT: tl.constexpr, HALF: tl.constexpr):
    """``h @ x`` on tensor cores, fp32 result. ``h`` (±1, 0) is exact in every format. DOT_SPLIT feeds
    x = hi + lo as two tf32 operands (fp32 accuracy at two products instead of tf32x3's three);
    DOT_HALF rounds x to ``HALF`` and multiplies natively (half the staging bytes of tf32)."""
    if DOT == 1:
        hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # tf32 truncation
        return tl.dot(h, x - hi, tl.dot(h, hi, input_precision="tf32"), input_precision="tf32")
    if DOT == 2:
        return tl.dot(h.to(HALF), x.to(HALF), out_dtype=tl.float32)
    if DOT == 3:
        return tl.dot(h, _round_to(x, HALF), input_precision="ieee")
    return tl.dot(h, x, input_precision="tf32")


@triton.jit
def _transform_and_rotate(x, h, BITS: tl.constexpr, M: tl.constexpr, C: tl.constexpr, DOT: tl.constexpr,
                          HALF: tl.constexpr):
    """Apply ``h`` to the top 4 bits of axis 0 of ``x`` (M, C), then rotate its top BITS to the bottom.

    After rotations totalling ``log2 M`` bits the axis is back in natural order.
    """
    y = _dot_h(h, tl.reshape(x, (16, M * C // 16)), DOT, HALF)
    y = tl.permute(tl.reshape(y, (1 << BITS, M >> BITS, C)), (1, 0, 2))
    return tl.reshape(y, (M, C))


@triton.jit
def _butterfly_and_rotate(x, M: tl.constexpr, C: tl.constexpr):
    """The 2-point transform of the top bit of axis 0 of ``x`` (M, C) as a butterfly (``a ± b`` of the two
    halves, exact in fp32), then that bit rotated to the bottom, as :func:`_transform_and_rotate` does."""
    a, b = tl.split(tl.permute(tl.reshape(x, (2, M // 2 * C)), (1, 0)))
    y = tl.permute(tl.reshape(tl.join(a + b, a - b), (M // 2, C, 2)), (0, 2, 1))
    return tl.reshape(y, (M, C))


@triton.jit
def _hadamard_axis0(x, LOG2_M: tl.constexpr, C: tl.constexpr, DOT: tl.constexpr, HALF: tl.constexpr):
    """Unnormalised ``H_M`` along axis 0 of an fp32 tile (M, C).

    The ``LOG2_M % 4`` bits left over by the 16-point tiles go through 2-point butterflies, not a mostly
    zero 16×16 dot: on sm_90 that is one dot stage (and its shared-memory restaging) fewer, e.g. at
    2^13 two barriers and a quarter of the MMAs fewer with the same shared memory. The 2^15 tile keeps the
    dot: there the butterflies take 80 registers instead of 63, which halves the blocks per SM.
    """
    M: tl.constexpr = 1 << LOG2_M
    REM: tl.constexpr = LOG2_M % 4
    if M * C < 32768:
        for _ in tl.static_range(REM):
            x = _butterfly_and_rotate(x, M, C)
    elif REM != 0:
        x = _transform_and_rotate(x, _hadamard_tile(REM), REM, M, C, DOT, HALF)
    h16 = _hadamard_tile(4)
    for _ in tl.static_range(LOG2_M // 4):
        x = _transform_and_rotate(x, h16, 4, M, C, DOT, HALF)
    return x


FUSION_FLAGS = ("in_mul", "gather", "row_scale", "out_mul", "scatter")


@triton.jit
def fwht_pass_kernel(
    x_ptr, y_ptr, in_mul_ptr, in_idx_ptr, row_scale_ptr, out_mul_ptr, out_idx_ptr,
    n_lines, in_cols, out_cols, LOG2_L, in_scale, LOG2_S: tl.constexpr,
    in_mul: tl.constexpr, gather: tl.constexpr, row_scale: tl.constexpr, out_mul: tl.constexpr,
    scatter: tl.constexpr,
    LOG2_M: tl.constexpr, C: tl.constexpr, STRIDED: tl.constexpr, DOT: tl.constexpr,
):
    """One pass: transform index bits [LOG2_S, LOG2_S + LOG2_M) of rows of length L = 2^LOG2_L.

    ``x`` is (rows, in_cols) and ``y`` (rows, out_cols), contiguous. Element (row, col) is read from
    ``x[row, in_idx[row, col] if GATHER else col]`` (zero where ``col >= in_cols``: the padding) and
    written to ``y[row, out_idx[row, col] if SCATTER else col]`` where ``col < out_cols`` (the
    truncation). Factor arrays are (rows, L), contiguous. ``in_scale`` (fp32) multiplies the loaded
    values (1.0 except in the first pass). The fusion switches and ``LOG2_S`` are
    constexprs: unused branches vanish and the strided offsets ``j << LOG2_S`` are compile-time
    shifts, so the compiler sees contiguous/aligned loads and stores (one binary per combination). Offsets are
    an int64 scalar base per program plus int32 tile offsets, keeping index math in 32 bits.
    """
    M: tl.constexpr = 1 << LOG2_M
    j = tl.arange(0, M)[:, None]
    c = tl.arange(0, C)[None, :]
    q0 = tl.program_id(0).to(tl.int64) * C
    if STRIDED:
        # C divides S, so all C columns of this program lie in one row and one high block.
        hi_bits = LOG2_L - LOG2_M - LOG2_S
        t = q0 >> LOG2_S
        row0 = t >> hi_bits
        col0 = ((t & ((1 << hi_bits) - 1)) << (LOG2_M + LOG2_S)) + (q0 & ((1 << LOG2_S) - 1))
        row = c * 0
        col = col0.to(tl.int32) + (j << LOG2_S) + c
        line_ok = c < C  # always true: the grid covers whole rows
    else:
        lines_bits = LOG2_L - LOG2_M
        row0 = q0 >> lines_bits
        q = (q0 - (row0 << lines_bits)).to(tl.int32) + c  # line index from the start of row0
        row = q >> lines_bits  # relative to row0
        col = ((q & ((1 << lines_bits) - 1)) << LOG2_M) + j
        line_ok = c < n_lines - q0
    fac = (row << LOG2_L) + col
    factor_base = row0 << LOG2_L

    in_ok = line_ok & (col < in_cols)
    src = col
    if gather:
        src = tl.load(in_idx_ptr + factor_base + fac, mask=in_ok, other=0).to(tl.int32)
    x = tl.load(x_ptr + row0 * in_cols + (row * in_cols + src), mask=in_ok, other=0.0).to(tl.float32)
    if in_mul:
        x *= tl.load(in_mul_ptr + factor_base + fac, mask=in_ok, other=0.0).to(tl.float32)
    if row_scale:
        x *= tl.load(row_scale_ptr + row0 + row, mask=line_ok, other=0.0).to(tl.float32)
    x *= in_scale

    y = _hadamard_axis0(x, LOG2_M, C, DOT, y_ptr.dtype.element_ty)

    out_ok = line_ok & (col < out_cols)
    if out_mul:
        y *= tl.load(out_mul_ptr + factor_base + fac, mask=out_ok, other=0.0).to(tl.float32)
    dst = col
    if scatter:
        dst = tl.load(out_idx_ptr + factor_base + fac, mask=out_ok, other=0).to(tl.int32)
    tl.store(y_ptr + row0 * out_cols + (row * out_cols + dst), y.to(y_ptr.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------------------
# Host side: pass planning and launch.


def plan_chunks(log2_n: int, half: bool = False) -> list[int]:
    """Index bits per pass: one contiguous chunk, then near-equal strided chunks (each >= 4 bits)."""
    if log2_n < MIN_LOG2:
        raise ValueError(f"the Triton FWHT needs n >= 2^{MIN_LOG2}, got 2^{log2_n}")
    max_contig = MAX_CONTIG_LOG2_HALF if half else MAX_CONTIG_LOG2
    if log2_n <= max_contig:
        return [log2_n]
    strided = max(MIN_LOG2, log2_n - max_contig)
    parts = -(-strided // MAX_STRIDED_LOG2)
    base, extra = divmod(strided, parts)
    return [log2_n - strided] + [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class PassConfig:
    """Compile-time shape of one pass (what the sm_90 report enumerates)."""

    log2_m: int
    strided: bool

    @property
    def tile_log2(self) -> int:
        if self.strided:
            return 12 if self.log2_m <= 8 else 13
        return max(12, self.log2_m)  # 2^14 and 2^15 contiguous tiles only with half operands

    @property
    def lines(self) -> int:  # C: lines (contiguous) or columns (strided) per program
        return 1 << (self.tile_log2 - self.log2_m)

    @property
    def num_warps(self) -> int:
        return WIDE_NUM_WARPS if self.tile_log2 >= 14 else NUM_WARPS


@dataclass(frozen=True)
class PassPlan:
    config: PassConfig
    log2_s: int  # stride of the transformed axis: bits already transformed
    first: bool
    last: bool


def plan_passes(log2_n: int, half: bool = False) -> list[PassPlan]:
    chunks = plan_chunks(log2_n, half)
    plans, log2_s = [], 0
    for i, bits in enumerate(chunks):
        cfg = PassConfig(bits, strided=i > 0)
        assert not cfg.strided or cfg.lines <= 1 << log2_s, "a strided tile must not span two rows"
        plans.append(PassPlan(cfg, log2_s, first=i == 0, last=i == len(chunks) - 1))
        log2_s += bits
    return plans


@dataclass(frozen=True)
class Fusion:
    """Optional prologue/epilogue operands of a transform (all (rows, L) unless noted)."""

    in_mul: torch.Tensor | None = None
    gather: torch.Tensor | None = None  # int32 (or int64) source index per element
    row_scale: torch.Tensor | None = None  # (rows,)
    out_mul: torch.Tensor | None = None
    scatter: torch.Tensor | None = None  # int32 (or int64) destination index per element


def dot_mode(dtype: torch.dtype, interpret: bool | None = None) -> int:
    """fp32 data: two tf32 terms (fp32 accuracy). fp16/bf16 data: native half operands, fp32 accumulation
    (each stage rounds to the data's own precision; emulated in fp32 under the Triton interpreter)."""
    if dtype == torch.float32:
        return DOT_SPLIT
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return DOT_HALF_EMULATED if interpret else DOT_HALF


def is_half_dot(dot: int) -> bool:
    return dot in (DOT_HALF, DOT_HALF_EMULATED)


def _pass_operands(fusion: Fusion, plan: PassPlan, device) -> tuple[list, list[int]]:
    """Fusion operands and on/off flags of one pass: prologue in the first, epilogue in the last."""
    active = {"in_mul": plan.first, "gather": plan.first, "row_scale": plan.first,
              "out_mul": plan.last, "scatter": plan.last}
    operands, flags = [], []
    for name in FUSION_FLAGS:
        tensor = getattr(fusion, name) if active[name] else None
        index = name in ("gather", "scatter")
        operands.append(_placeholder(device, torch.int32 if index else torch.float32) if tensor is None else tensor)
        flags.append(tensor is not None)
    return operands, flags


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Stands in for an unused fusion operand (never dereferenced); the usual dtype keeps one binary."""
    return torch.empty(1, device=device, dtype=dtype)


def _launch_pass(src, dst, rows, log2_l, plan: PassPlan, fusion: Fusion, in_cols, out_cols, dot, scale):
    cfg = plan.config
    length = 1 << log2_l
    in_cols = in_cols if plan.first else length
    out_cols = out_cols if plan.last else length
    n_lines = rows << (log2_l - cfg.log2_m)
    operands, flags = _pass_operands(fusion, plan, dst.device)
    fwht_pass_kernel[(triton.cdiv(n_lines, cfg.lines),)](
        src, dst, *operands, n_lines, in_cols, out_cols, log2_l, scale if plan.first else 1.0,
        LOG2_S=plan.log2_s, **dict(zip(FUSION_FLAGS, flags)),
        LOG2_M=cfg.log2_m, C=cfg.lines, STRIDED=cfg.strided, DOT=dot, num_warps=cfg.num_warps,
        maxnreg=max_registers(cfg.log2_m, cfg.strided, dot),
    )


def hadamard_transform(src: torch.Tensor, dst: torch.Tensor, rows: int, length: int, *,
                       in_cols: int | None = None, out_cols: int | None = None,
                       fusion: Fusion = Fusion(), workspace: torch.Tensor | None = None,
                       out_scale: float = 1.0) -> torch.Tensor:
    """``dst[r, :out_cols] = epilogue(out_scale · H_length · prologue(pad(src[r, :in_cols])))`` per row.

    ``src`` is (rows, in_cols) and ``dst`` is (rows, out_cols), both contiguous. A multi-pass
    transform goes through a ``workspace`` of shape (rows, length) in dst's dtype (fp32 for an fp32
    dst), transformed in place; it must not alias ``src`` when gathering nor ``dst`` when scattering.
    ``out_scale`` is applied to the loaded values of the first pass (the transform is linear).
    """
    log2_l = length.bit_length() - 1
    if log2_l > MAX_LOG2:
        raise ValueError(f"the Triton FWHT handles lengths up to 2^{MAX_LOG2}, got 2^{log2_l}")
    dot = dot_mode(dst.dtype)
    plans = plan_passes(log2_l, is_half_dot(dot))
    if rows == 0:
        return dst
    if len(plans) > 1 and workspace is None:
        workspace = torch.empty(rows, length, device=dst.device, dtype=dst.dtype)
    if len(plans) > 1 and workspace.dtype != dst.dtype:
        raise ValueError(f"hadamard_transform: the workspace must have dst's dtype {dst.dtype}, got {workspace.dtype}")
    in_cols = length if in_cols is None else in_cols
    out_cols = length if out_cols is None else out_cols
    for plan in plans:
        _launch_pass(src if plan.first else workspace, dst if plan.last else workspace, rows, log2_l, plan,
                     fusion, in_cols, out_cols, dot, float(out_scale))
    return dst


def fwht_triton(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale · H x`` over the last dimension of a contiguous fp32/fp16/bf16 tensor (length 2^4 .. 2^30).

    ``scale`` multiplies the values as the first pass loads them, so no intermediate exceeds the scaled
    output's bound (fp16 stays finite whenever the result is). Multi-pass transforms reuse the output as
    their workspace."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    return hadamard_transform(x, out, x.numel() // n, n, workspace=out, out_scale=scale)
