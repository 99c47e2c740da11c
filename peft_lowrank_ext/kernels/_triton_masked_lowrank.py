"""Triton kernels for the masked / gated low-rank product ``y = s · ((x (A ⊙ mask)ᵀ) ⊙ g) Bᵀ``.

Forward: one program owns ``BLOCK_N`` tokens, streams ``x`` once to build ``h = x Aᵀ`` (BLOCK_N ×
r, kept in registers), scales it by ``g·s`` and streams ``B`` to write ``y``. Backward: a row
kernel (``dy`` → ``dh``, ``dx``, per-block partial ``dg``) and a weight kernel (``dA = dhᵀ x``,
``dB = dyᵀ (h g s)``, split over tokens into partial sums: deterministic, no atomics).

Rank skipping: the host orders ranks with a non-zero gate first and stores their count on the
device (``order = [count, rank...]``), so there is no host sync. Each kernel reads the count and
runs the narrowest rank width (16, 32 or 64, at most R_PAD) that holds the active ranks;
inactive ranks are neither loaded nor multiplied. With no active rank nothing is read: the
forward writes the base output (or zeros) and the backward writes dx = 0. Skipping is only used when
the gate needs no gradient (``dg`` of a zero gate is not zero).

Every load is upcast to fp32 (the Triton interpreter mishandles bf16 arithmetic); fp16/bf16
values are exact in tf32, so half inputs lose nothing in ``tl.dot``; fp32 inputs use tf32x3.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .masked_lowrank import MAX_TRITON_RANK

BLOCK_N, BLOCK_K, BLOCK_D = 64, 32, 64


@triton.jit
def _active_ranks(order_ptr, n_act, W: tl.constexpr):
    """The first W slots of the rank order: rank indices and whether each slot is active."""
    slot = tl.arange(0, W)
    ok = slot < n_act
    return tl.load(order_ptr + 1 + slot, mask=ok, other=0), ok


@triton.jit
def _width_selected(n_act, W: tl.constexpr, NARROWEST: tl.constexpr):
    """True for exactly one width of the ladder NARROWEST, 2·NARROWEST, ..., R_PAD; none when no rank is
    active (then the kernels only write what must be written: no x, A, B or dy is read)."""
    if W == NARROWEST:
        return (n_act <= W) & (n_act > 0)
    return (n_act <= W) & (n_act > W // 2)


@triton.jit
def _store_rows(src_ptr, dst_ptr, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, COPY: tl.constexpr):
    """``dst[rows] = src[rows]`` (COPY) or 0 for this program's BLOCK_N rows of a (N, D) tensor."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        offs = rows[:, None] * D + ds[None, :]
        ok = (rows < N)[:, None] & (ds < D)[None, :]
        value = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        if COPY:
            value = tl.load(src_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dst_ptr + offs, value.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _load_a(a_ptr, mask_ptr, offs, ok, HAS_MASK: tl.constexpr):
    a = tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        a *= tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    return a


@triton.jit
def _fwd_body(x_ptr, a_ptr, mask_ptr, b_ptr, g_ptr, order_ptr, y_ptr, h_ptr, base_ptr,
              N, D_IN, D_OUT, R, scale, n_act, W: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ranks, rank_ok = _active_ranks(order_ptr, n_act, W)
    h = tl.zeros((BLOCK_N, W), tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D_IN
        x = tl.load(x_ptr + rows[:, None] * D_IN + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        a_t = _load_a(a_ptr, mask_ptr, ranks[None, :] * D_IN + ks[:, None], k_ok[:, None] & rank_ok[None, :],
                      HAS_MASK)
        h = tl.dot(x, a_t, h, input_precision=PRECISION)
    tl.store(h_ptr + rows[:, None] * R + ranks[None, :], h, mask=row_ok[:, None] & rank_ok[None, :])
    gs = tl.load(g_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32) * scale
    hg = h * gs[None, :]
    for d0 in range(0, D_OUT, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D_OUT
        b_t = tl.load(b_ptr + ds[None, :] * R + ranks[:, None], mask=rank_ok[:, None] & d_ok[None, :],
                      other=0.0).to(tl.float32)
        y = tl.dot(hg, b_t, input_precision=PRECISION)
        y_offs = rows[:, None] * D_OUT + ds[None, :]
        y_ok = row_ok[:, None] & d_ok[None, :]
        if HAS_BASE:  # the layer's base output, accumulated here instead of in a separate pass
            y += tl.load(base_ptr + y_offs, mask=y_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offs, y.to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def masked_lowrank_fwd_kernel(x_ptr, a_ptr, mask_ptr, b_ptr, g_ptr, order_ptr, y_ptr, h_ptr, base_ptr,
                              N, D_IN, D_OUT, R, scale, R_PAD: tl.constexpr, LEVELS: tl.constexpr,
                              HAS_MASK: tl.constexpr, HAS_BASE: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """y = [base +] s·((x Aᵀ) ⊙ g) Bᵀ and h = x Aᵀ (fp32, active ranks) for BLOCK_N tokens."""
    n_act = tl.load(order_ptr)
    if n_act == 0:  # every gate zero: y is the base output (or zeros); h stays the caller's zeros
        _store_rows(base_ptr, y_ptr, N, D_OUT, BLOCK_N, BLOCK_D, HAS_BASE)
    for level in tl.static_range(LEVELS + 1):
        if _width_selected(n_act, R_PAD >> (LEVELS - level), R_PAD >> LEVELS):
            _fwd_body(x_ptr, a_ptr, mask_ptr, b_ptr, g_ptr, order_ptr, y_ptr, h_ptr, base_ptr, N, D_IN, D_OUT,
                      R, scale, n_act, R_PAD >> (LEVELS - level), HAS_MASK, HAS_BASE, BLOCK_N, BLOCK_K, BLOCK_D,
                      PRECISION)


@triton.jit
def _bwd_rows_body(dy_ptr, h_ptr, a_ptr, mask_ptr, b_ptr, g_ptr, order_ptr, dx_ptr, dh_ptr, dg_ptr,
                   N, D_IN, D_OUT, R, scale, n_act, W: tl.constexpr, HAS_MASK: tl.constexpr,
                   GATE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    ranks, rank_ok = _active_ranks(order_ptr, n_act, W)
    hr_ok = row_ok[:, None] & rank_ok[None, :]
    dhg = tl.zeros((BLOCK_N, W), tl.float32)  # dy B: gradient of the gated product
    for d0 in range(0, D_OUT, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D_OUT
        dy = tl.load(dy_ptr + rows[:, None] * D_OUT + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        b = tl.load(b_ptr + ds[:, None] * R + ranks[None, :], mask=d_ok[:, None] & rank_ok[None, :],
                    other=0.0).to(tl.float32)
        dhg = tl.dot(dy, b, dhg, input_precision=PRECISION)
    if GATE_GRAD:
        h = tl.load(h_ptr + rows[:, None] * R + ranks[None, :], mask=hr_ok, other=0.0)
        tl.store(dg_ptr + pid * R + ranks, tl.sum(h * dhg, 0) * scale, mask=rank_ok)
    dh = dhg * (tl.load(g_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32) * scale)[None, :]
    tl.store(dh_ptr + rows[:, None] * R + ranks[None, :], dh, mask=hr_ok)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D_IN
        a = _load_a(a_ptr, mask_ptr, ranks[:, None] * D_IN + ks[None, :], rank_ok[:, None] & k_ok[None, :],
                    HAS_MASK)
        dx = tl.dot(dh, a, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * D_IN + ks[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def masked_lowrank_bwd_rows_kernel(dy_ptr, h_ptr, a_ptr, mask_ptr, b_ptr, g_ptr, order_ptr, dx_ptr,
                                   dh_ptr, dg_ptr, N, D_IN, D_OUT, R, scale, R_PAD: tl.constexpr,
                                   LEVELS: tl.constexpr, HAS_MASK: tl.constexpr, GATE_GRAD: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                                   PRECISION: tl.constexpr):
    """dh = (dy B) ⊙ g·s (fp32), dx = dh A, and this block's share of dg = s·Σ h ⊙ (dy B)."""
    n_act = tl.load(order_ptr)
    if n_act == 0:  # every gate zero (and no gate gradient): dx = 0 without reading dy; dh is never read
        _store_rows(dx_ptr, dx_ptr, N, D_IN, BLOCK_N, BLOCK_K, False)
    for level in tl.static_range(LEVELS + 1):
        if _width_selected(n_act, R_PAD >> (LEVELS - level), R_PAD >> LEVELS):
            _bwd_rows_body(dy_ptr, h_ptr, a_ptr, mask_ptr, b_ptr, g_ptr, order_ptr, dx_ptr, dh_ptr, dg_ptr,
                           N, D_IN, D_OUT, R, scale, n_act, R_PAD >> (LEVELS - level), HAS_MASK, GATE_GRAD,
                           BLOCK_N, BLOCK_K, BLOCK_D, PRECISION)


@triton.jit
def _grad_a_tile(x_ptr, dh_ptr, mask_ptr, da_ptr, tile, split, n_start, n_end, N, D_IN, R, ranks, rank_ok,
                 W: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D_IN
    acc = tl.zeros((W, BLOCK_D), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = ns < n_end
        dh_t = tl.load(dh_ptr + ns[None, :] * R + ranks[:, None], mask=rank_ok[:, None] & n_ok[None, :], other=0.0)
        x = tl.load(x_ptr + ns[:, None] * D_IN + cols[None, :], mask=n_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        acc = tl.dot(dh_t, x, acc, input_precision=PRECISION)
    offs = ranks[:, None] * D_IN + cols[None, :]
    ok = rank_ok[:, None] & col_ok[None, :]
    if HAS_MASK:
        acc *= tl.load(mask_ptr + offs, mask=ok, other=0).to(tl.float32)
    tl.store(da_ptr + split * R * D_IN + offs, acc, mask=ok)


@triton.jit
def _grad_b_tile(dy_ptr, h_ptr, g_ptr, db_ptr, tile, split, n_start, n_end, N, D_OUT, R, scale, ranks,
                 rank_ok, W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    cols = tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D_OUT
    gs = tl.load(g_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32) * scale
    acc = tl.zeros((BLOCK_D, W), tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = ns < n_end
        dy_t = tl.load(dy_ptr + ns[None, :] * D_OUT + cols[:, None], mask=col_ok[:, None] & n_ok[None, :],
                       other=0.0).to(tl.float32)
        h = tl.load(h_ptr + ns[:, None] * R + ranks[None, :], mask=n_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = tl.dot(dy_t, h * gs[None, :], acc, input_precision=PRECISION)
    tl.store(db_ptr + split * D_OUT * R + cols[:, None] * R + ranks[None, :], acc,
             mask=col_ok[:, None] & rank_ok[None, :])


@triton.jit
def _bwd_weights_body(x_ptr, dy_ptr, h_ptr, dh_ptr, mask_ptr, g_ptr, order_ptr, da_ptr, db_ptr,
                      N, D_IN, D_OUT, R, scale, rows_per_split, n_act, W: tl.constexpr,
                      HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    n_start = split.to(tl.int64) * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    ranks, rank_ok = _active_ranks(order_ptr, n_act, W)
    tiles_in = tl.cdiv(D_IN, BLOCK_D)
    if tile < tiles_in:
        _grad_a_tile(x_ptr, dh_ptr, mask_ptr, da_ptr, tile, split, n_start, n_end, N, D_IN, R, ranks, rank_ok,
                     W, HAS_MASK, BLOCK_N, BLOCK_D, PRECISION)
    else:
        _grad_b_tile(dy_ptr, h_ptr, g_ptr, db_ptr, tile - tiles_in, split, n_start, n_end, N, D_OUT, R, scale,
                     ranks, rank_ok, W, BLOCK_N, BLOCK_D, PRECISION)


@triton.jit
def masked_lowrank_bwd_weights_kernel(x_ptr, dy_ptr, h_ptr, dh_ptr, mask_ptr, g_ptr, order_ptr, da_ptr, db_ptr,
                                      N, D_IN, D_OUT, R, scale, rows_per_split, R_PAD: tl.constexpr,
                                      LEVELS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Partial dA (⊙ mask) and dB over one token split, for one column tile of A or of B."""
    n_act = tl.load(order_ptr)
    for level in tl.static_range(LEVELS + 1):
        if _width_selected(n_act, R_PAD >> (LEVELS - level), R_PAD >> LEVELS):
            _bwd_weights_body(x_ptr, dy_ptr, h_ptr, dh_ptr, mask_ptr, g_ptr, order_ptr, da_ptr, db_ptr,
                              N, D_IN, D_OUT, R, scale, rows_per_split, n_act, R_PAD >> (LEVELS - level),
                              HAS_MASK, BLOCK_N, BLOCK_D, PRECISION)


# ----------------------------------------------------------------------------------------------
# Host side.


NUM_WARPS = 8  # 4 warps spill in the fp32 (tf32x3) weight-gradient kernel


def rank_config(r: int) -> dict[str, int]:
    """Two compiled widths: 16 for r <= 16 (the common LoRA ranks), else 64 with the 16/32/64 ladder.

    Wider ranks would need tiles that 8 warps cannot hold without spilling.
    """
    if r > MAX_TRITON_RANK:
        raise ValueError(f"the Triton masked low-rank kernels support r <= {MAX_TRITON_RANK}, got {r}")
    return {"R_PAD": 16, "LEVELS": 0} if r <= 16 else {"R_PAD": MAX_TRITON_RANK, "LEVELS": 2}


def dot_precision(*tensors: torch.Tensor) -> str:
    half = (torch.float16, torch.bfloat16)
    return "tf32" if all(t.dtype in half for t in tensors) else "tf32x3"


@functools.lru_cache(maxsize=64)
def _all_ranks(r: int, device: torch.device) -> torch.Tensor:
    return torch.arange(r + 1, device=device, dtype=torch.int32).roll(1)  # [r, 0, 1, ..., r-1]


def rank_order(gate: torch.Tensor, skip_zero_gates: bool) -> torch.Tensor:
    """int32 ``[count, ranks...]``: active ranks first, computed on the device without a sync (and, when
    every rank runs, built once per rank and device instead of two launches per call)."""
    r = gate.numel()
    if not skip_zero_gates:
        return _all_ranks(r, gate.device)
    keep = gate != 0
    order = torch.argsort((~keep).to(torch.int8), stable=True)
    return torch.cat([keep.sum().reshape(1), order]).to(torch.int32)


def masked_lowrank_fwd_triton(x, a, b, gate, mask, scale: float, skip_zero_gates: bool, base=None):
    """Returns ``y`` (N, d_out) and ``h = x Aᵀ`` (N, r) fp32 (zero for skipped ranks). ``y`` is in x's
    dtype, or ``base + update`` in base's dtype when a contiguous (N, d_out) ``base`` is given."""
    n, d_in = x.shape
    d_out, r = b.shape
    y = torch.empty(n, d_out, device=x.device, dtype=x.dtype if base is None else base.dtype)
    h = (torch.zeros if skip_zero_gates else torch.empty)(n, r, device=x.device, dtype=torch.float32)
    if n == 0:
        return y, h
    cfg = rank_config(r)
    masked_lowrank_fwd_kernel[(triton.cdiv(n, BLOCK_N),)](
        x, a, a if mask is None else mask, b, gate, rank_order(gate, skip_zero_gates), y, h,
        y if base is None else base, n, d_in, d_out, r, scale, HAS_MASK=mask is not None,
        HAS_BASE=base is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_D=BLOCK_D, PRECISION=dot_precision(x, a, b), num_warps=NUM_WARPS, **cfg,
    )
    return y, h


def _token_splits(n: int, tiles: int, device: torch.device) -> int:
    """Enough token splits for about two programs per SM; 1 off the GPU (interpreter tests)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n, BLOCK_N), triton.cdiv(2 * sms, tiles)))


def masked_lowrank_bwd_triton(grad_y, x, a, b, gate, mask, h, scale: float, gate_grad: bool,
                              splits: int | None = None):
    """Returns (dx, dA, dB, dg) in the dtypes of x, A, B, gate; dg is zero unless ``gate_grad``."""
    n, d_in = x.shape
    d_out, r = b.shape
    dev = x.device
    cfg = rank_config(r)
    precision = dot_precision(grad_y, x, a, b)
    common = dict(HAS_MASK=mask is not None, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=precision,
                  num_warps=NUM_WARPS, **cfg)
    mask_arg = a if mask is None else mask
    order = rank_order(gate, not gate_grad)
    row_blocks = triton.cdiv(n, BLOCK_N)

    dx = torch.empty_like(x)
    dh = torch.empty(n, r, device=dev, dtype=torch.float32)
    dg_part = torch.zeros(max(row_blocks, 1), r, device=dev, dtype=torch.float32)
    if n:
        masked_lowrank_bwd_rows_kernel[(row_blocks,)](
            grad_y, h, a, mask_arg, b, gate, order, dx, dh, dg_part, n, d_in, d_out, r, scale,
            GATE_GRAD=gate_grad, BLOCK_K=BLOCK_K, **common,
        )

    tiles = triton.cdiv(d_in, BLOCK_D) + triton.cdiv(d_out, BLOCK_D)
    splits = splits or _token_splits(n, tiles, dev)
    rows_per_split = triton.cdiv(triton.cdiv(max(n, 1), splits), BLOCK_N) * BLOCK_N
    alloc = torch.empty if gate_grad else torch.zeros  # skipped ranks are never written
    da = alloc(splits, r, d_in, device=dev, dtype=torch.float32)
    db = alloc(splits, d_out, r, device=dev, dtype=torch.float32)
    masked_lowrank_bwd_weights_kernel[(tiles, splits)](
        x, grad_y, h, dh, mask_arg, gate, order, da, db, n, d_in, d_out, r, scale, rows_per_split, **common,
    )
    return dx, da.sum(0).to(a.dtype), db.sum(0).to(b.dtype), dg_part.sum(0).to(gate.dtype)
