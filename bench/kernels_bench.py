"""Benchmarks of the Triton kernels (FWHT, masked low-rank product, Fastfood projection).

Needs a CUDA GPU; without one it says so and exits 0. ``--report-sm90`` needs no GPU: it compiles
every kernel configuration for H100 and writes the registers/spills/shared-memory table to
``bench/KERNELS_REPORT.md``.

    python bench/kernels_bench.py                   # everything
    python bench/kernels_bench.py --only fwht       # fwht | masked | fastfood
    python bench/kernels_bench.py --report-sm90     # compile report, no GPU needed

Times come from ``triton.testing.do_bench`` (median, ms). "copy" is the bandwidth of a device copy
of the same number of bytes, measured in the same run, so "of copy" is the fraction of the
achievable memory bandwidth a memory-bound kernel reaches.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_lowrank_ext.kernels import fastfood_project, fwht, fwht_reference, masked_lowrank  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def copy_gbps(nbytes: int) -> float:
    """Bandwidth of a device-to-device copy moving ``nbytes`` in and ``nbytes`` out."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src)) / 1e6


def _optional(module: str, name: str):
    try:
        return getattr(__import__(module), name)
    except ImportError:
        return None


def _ratio(base: float | None, t: float) -> str:
    return f"{base / t:7.2f}x" if base else "      -"


# ----------------------------------------------------------------------------------------------
# FWHT


def bench_fwht(log2_sizes: list[int], total_log2: int) -> None:
    pypi_fwht = _optional("hadamard_transform", "hadamard_transform")  # pure PyTorch, normalised
    dao_fwht = _optional("fast_hadamard_transform", "hadamard_transform")  # CUDA, n <= 32768
    print("\n## FWHT (unnormalised, last dimension)")
    print(f"hadamard-transform: {'yes' if pypi_fwht else 'not installed'}; "
          f"fast-hadamard-transform: {'yes' if dao_fwht else 'not installed'}")
    print(f"{'n':>9} {'rows':>7} {'dtype':>5} {'ms':>9} {'GB/s':>7} {'of copy':>7} "
          f"{'vs torch':>8} {'vs hadamard-transform':>21} {'vs fast-hadamard':>16}")
    for log2_n in log2_sizes:
        n, rows = 1 << log2_n, max(1, 1 << (total_log2 - log2_n))
        for name, dtype in DTYPES.items():
            x = torch.randn(rows, n, device="cuda").to(dtype)
            nbytes = x.numel() * x.element_size()
            t = bench(lambda: fwht(x))
            t_torch = bench(lambda: fwht_reference(x))
            t_pypi = bench(lambda: pypi_fwht(x)) if pypi_fwht else None
            t_dao = bench(lambda: dao_fwht(x)) if dao_fwht and n <= 32768 else None
            gbps = 2 * nbytes / t / 1e6
            print(f"{n:>9} {rows:>7} {name:>5} {t:9.4f} {gbps:7.0f} {gbps / copy_gbps(nbytes):7.2f} "
                  f"{_ratio(t_torch, t):>8} {_ratio(t_pypi, t):>21} {_ratio(t_dao, t):>16}")


# ----------------------------------------------------------------------------------------------
# Masked / gated low-rank product


def _unfused(x, a, b, gate, scale, mask):
    return scale * ((x @ (a * mask).T) * gate) @ b.T


def _fwd_bwd(fn, inputs, grad):
    return lambda: torch.autograd.grad(fn(), inputs, grad)


def bench_masked(tokens: int, dim: int, ranks: list[int], dtype: torch.dtype) -> None:
    print(f"\n## Masked low-rank product, {tokens} tokens, d_in = d_out = {dim}, {dtype}")
    print("gate is a 0/1 rank mask without gradient (masked ranks are skipped); element mask on A")
    print(f"{'r':>4} {'masked':>7} {'fwd ms':>9} {'torch fwd':>9} {'speed-up':>8} "
          f"{'fwd+bwd ms':>10} {'torch f+b':>9} {'speed-up':>8} {'fwd GB/s':>8}")
    for r in ranks:
        x = torch.randn(tokens, dim, device="cuda", dtype=dtype, requires_grad=True)
        a = (torch.randn(r, dim, device="cuda", dtype=dtype) / math.sqrt(dim)).requires_grad_()
        b = (torch.randn(dim, r, device="cuda", dtype=dtype) / math.sqrt(r)).requires_grad_()
        mask = (torch.rand(r, dim, device="cuda") > 0.5).to(dtype)
        grad = torch.randn(tokens, dim, device="cuda", dtype=dtype)
        for frac in (0.0, 0.25, 0.5, 0.75):
            gate = torch.ones(r, device="cuda", dtype=dtype)
            gate[: int(frac * r)] = 0
            fused = lambda: masked_lowrank(x, a, b, gate, 2.0, mask)  # noqa: E731
            unfused = lambda: _unfused(x, a, b, gate, 2.0, mask)  # noqa: E731
            with torch.no_grad():
                t_f, t_uf = bench(fused), bench(unfused)
            t_fb, t_ufb = bench(_fwd_bwd(fused, (x, a, b), grad)), bench(_fwd_bwd(unfused, (x, a, b), grad))
            gbps = 2 * x.numel() * x.element_size() / t_f / 1e6
            print(f"{r:>4} {frac:>7.0%} {t_f:9.4f} {t_uf:9.4f} {t_uf / t_f:7.2f}x "
                  f"{t_fb:10.4f} {t_ufb:9.4f} {t_ufb / t_fb:7.2f}x {gbps:8.0f}")


# ----------------------------------------------------------------------------------------------
# Fastfood projection for a 7B-shaped model


LLAMA_7B_MODULES = {  # name: (d_in, d_out); 32 layers each
    "q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
    "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096),
}


def _groups_7b(r: int, ratio: float, layers: int) -> list[tuple[int, int, int, int]]:
    """(modules, d, out_dim, L) per distinct shape: D = r (d_in + d_out), L = 2^ceil(log2 D)."""
    shapes: dict[tuple[int, int, int], int] = {}
    for d_in, d_out in LLAMA_7B_MODULES.values():
        out_dim = r * (d_in + d_out)
        key = (math.ceil(ratio * out_dim), out_dim, 1 << math.ceil(math.log2(out_dim)))
        shapes[key] = shapes.get(key, 0) + layers
    return [(m, d, out, length) for (d, out, length), m in shapes.items()]


def _torch_fastfood(z, signs, perm, gauss, out_dim):
    """The pure-PyTorch chain (log2 L passes per transform), as a user would write it."""
    length = signs.shape[-1]
    u = fwht_reference(torch.nn.functional.pad(z, (0, length - z.shape[-1])) * signs)
    v = fwht_reference(torch.gather(u, 1, perm) * gauss)[:, :out_dim]
    return v / (gauss.norm(dim=-1, keepdim=True) * math.sqrt(out_dim))


def bench_fastfood(r: int, ratio: float, layers: int) -> None:
    groups = _groups_7b(r, ratio, layers)
    print(f"\n## Fastfood factor generation per training step, 7B shapes (r={r}, d = {ratio:g}·D, {layers} layers)")
    print(f"{'modules':>7} {'d':>7} {'D':>7} {'L':>7} {'fwd ms':>9} {'f+b ms':>9} {'torch f+b':>9} {'speed-up':>8}")
    total, total_torch = 0.0, 0.0
    for modules, d, out_dim, length in groups:
        z = torch.zeros(modules, d, device="cuda", requires_grad=True)
        signs = (torch.randint(0, 2, (modules, length), device="cuda") * 2 - 1).float()
        perm = torch.argsort(torch.rand(modules, length, device="cuda"), dim=1)
        gauss = torch.randn(modules, length, device="cuda")
        grad = torch.randn(modules, out_dim, device="cuda")
        ours = lambda: fastfood_project(z, signs, perm, gauss, out_dim)  # noqa: E731
        theirs = lambda: _torch_fastfood(z, signs, perm, gauss, out_dim)  # noqa: E731
        with torch.no_grad():
            t_fwd = bench(ours)
        t_fb, t_torch = bench(_fwd_bwd(ours, (z,), grad)), bench(_fwd_bwd(theirs, (z,), grad))
        total, total_torch = total + t_fb, total_torch + t_torch
        print(f"{modules:>7} {d:>7} {out_dim:>7} {length:>7} {t_fwd:9.3f} {t_fb:9.3f} {t_torch:9.3f} "
              f"{t_torch / t_fb:7.2f}x")
    print(f"{'per step':>31} {'':>9} {total:9.3f} {total_torch:9.3f} {total_torch / total:7.2f}x")


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks of the peft_lowrank_ext Triton kernels.")
    parser.add_argument("--report-sm90", action="store_true",
                        help="compile every kernel for H100 (no GPU needed) and write the report")
    parser.add_argument("--report-path", default=str(ROOT / "bench" / "KERNELS_REPORT.md"))
    parser.add_argument("--only", choices=["fwht", "masked", "fastfood"])
    parser.add_argument("--fwht-sizes", default="4,8,10,12,13,14,16,18,20,22", help="log2 lengths")
    parser.add_argument("--fwht-total-log2", type=int, default=26, help="log2 of elements per FWHT call")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ranks", default="8,16,32,64")
    parser.add_argument("--masked-dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--fastfood-rank", type=int, default=8)
    parser.add_argument("--fastfood-ratio", type=float, default=0.01, help="intrinsic dimension d / D")
    parser.add_argument("--layers", type=int, default=32)
    args = parser.parse_args(argv)

    if args.report_sm90:
        import sm90_report  # a developer tool beside this script, not part of the package

        return sm90_report.main(["--write", args.report_path])
    if not torch.cuda.is_available():
        print("bench/kernels_bench.py: no CUDA GPU here, nothing to time. "
              "Run it on a GPU machine, or use --report-sm90 for the H100 compile report.")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if args.only in (None, "fwht"):
        bench_fwht([int(v) for v in args.fwht_sizes.split(",")], args.fwht_total_log2)
    if args.only in (None, "masked"):
        bench_masked(args.tokens, args.dim, [int(v) for v in args.ranks.split(",")], DTYPES[args.masked_dtype])
    if args.only in (None, "fastfood"):
        bench_fastfood(args.fastfood_rank, args.fastfood_ratio, args.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
