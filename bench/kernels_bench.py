"""The GPU run of the Triton kernels, prepared to be run once: numerics first, then timings.

On a CUDA machine, ``python bench/kernels_bench.py --out DIR`` (≤ 8 minutes on an H100/H200; a time budget
skips what does not fit):

1. checks every kernel against float64 references **on the GPU** (TF32 and half-precision numerics
   are not covered by the Triton interpreter): FWHT (one- and two-pass sizes, fp32/fp16/bf16),
   Fastfood forward + backward, the masked low-rank product forward + backward;
2. times with ``triton.testing.do_bench`` (all samples; mean and median reported) against the
   baselines: a device copy of the same bytes, the pure-PyTorch FWHT, Dao's ``fast-hadamard-transform``
   where it imports; for the masked product the fused Triton kernel against the default ATen path
   (``addmm`` into the base output), the unfused cuBLAS sequence and ``addmm_``; the pure-PyTorch
   Fastfood chain;
3. writes ``kernels.json`` and ``kernels.md`` to ``DIR``.

It imports only torch, triton and ``peft_lowrank_ext.kernels`` (loaded without the package's
``__init__``, so no PEFT/transformers import), so it runs on the lent machine's own stack.
``--dry-run`` goes through every step on the CPU with tiny sizes and a wall-clock timer (the tests run
it), so the first GPU run cannot fail on a typo. ``--report-sm90`` (no GPU) writes the H100 compile
report (``bench/sm90_report.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Normwise error bound (max |kernel − float64| / max |float64|) per input dtype: the inputs are rounded to
# the dtype and the kernels accumulate in fp32 (split TF32 for fp32 inputs).
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2}


def load_kernels():
    """``peft_lowrank_ext.kernels`` without running ``peft_lowrank_ext/__init__`` (which imports PEFT)."""
    if "peft_lowrank_ext" not in sys.modules:
        stub = types.ModuleType("peft_lowrank_ext")
        stub.__path__ = [str(ROOT / "peft_lowrank_ext")]
        sys.modules["peft_lowrank_ext"] = stub
    return importlib.import_module("peft_lowrank_ext.kernels")


class Timer:
    """``do_bench`` samples on CUDA; on the CPU dry run, a few wall-clock samples."""

    def __init__(self, device: str, warmup_ms: int = 25, rep_ms: int = 100):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def __call__(self, fn) -> dict:
        if self.device == "cuda":
            from triton.testing import do_bench

            samples = do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="all")
        else:
            fn()
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e3)
        samples = [float(s) for s in samples]
        return {"mean_ms": statistics.fmean(samples), "median_ms": statistics.median(samples), "n": len(samples)}


def normwise_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# ----- 1. numerics ------------------------------------------------------------------------------
def check_fwht(k, device: str, sizes: list[int]) -> list[dict]:
    out = []
    for log2_n in sizes:
        for name, dtype in DTYPES.items():
            x = torch.randn(4, 1 << log2_n, device=device).to(dtype)
            ref = k.fwht_reference(x.double(), scale=(1 << log2_n) ** -0.5)
            err = normwise_error(k.fwht(x, scale=(1 << log2_n) ** -0.5), ref)
            out.append({"op": "fwht", "n": 1 << log2_n, "dtype": name, "error": err, "tolerance": TOLERANCE[name],
                        "ok": err <= TOLERANCE[name]})
    return out


def _fastfood_inputs(device, modules: int, d: int, out_dim: int, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    length = 1 << math.ceil(math.log2(max(d, out_dim)))
    signs = (torch.randint(0, 2, (modules, length), generator=gen) * 2 - 1).float()
    perm = torch.argsort(torch.rand(modules, length, generator=gen), dim=1)
    gauss = torch.randn(modules, length, generator=gen)
    z = torch.randn(modules, d, generator=gen)
    return [t.to(device) for t in (z, signs, perm, gauss)]


def check_fastfood(k, device: str, shapes: list[tuple[int, int]]) -> list[dict]:
    out = []
    for d, out_dim in shapes:
        z, signs, perm, gauss = _fastfood_inputs(device, 3, d, out_dim)
        z.requires_grad_(True)
        y = k.fastfood_project(z, signs, perm, gauss, out_dim)
        grad = torch.randn_like(y)
        (dz,) = torch.autograd.grad(y, z, grad)
        z64 = z.detach().double().requires_grad_(True)
        y64 = k.fastfood_reference(z64, signs.double(), perm, gauss.double(), out_dim)
        (dz64,) = torch.autograd.grad(y64, z64, grad.double())
        for what, got, ref in (("forward", y, y64), ("backward", dz, dz64)):
            err = normwise_error(got.detach(), ref.detach())
            out.append({"op": f"fastfood {what}", "d": d, "out_dim": out_dim, "dtype": "fp32", "error": err,
                        "tolerance": TOLERANCE["fp32"], "ok": err <= TOLERANCE["fp32"]})
    return out


def _masked_inputs(device, tokens: int, d_in: int, d_out: int, r: int, dtype, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, d_in, generator=gen)
    a = torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)
    b = torch.randn(d_out, r, generator=gen) / math.sqrt(r)
    mask = (torch.rand(r, d_in, generator=gen) > 0.3).float()
    gate = torch.rand(r, generator=gen)
    return [t.to(device, dtype) for t in (x, a, b, mask, gate)]


MASKED_KERNELS = ("triton", "aten")  # the fused Triton kernel; the ATen/cuBLAS sequence ("auto" picks it)


def check_masked(k, device: str, shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Both implementations, forward (accumulated into a base output, as the layers call it) and every
    gradient, against float64."""
    out = []
    for tokens, dim, r in shapes:
        for name, dtype in DTYPES.items():
            for kernel in MASKED_KERNELS:
                x, a, b, mask, gate = _masked_inputs(device, tokens, dim, dim, r, dtype)
                base = torch.randn(tokens, dim, device=device, dtype=dtype)
                leaves = [t.requires_grad_(True) for t in (x, a, b, gate)]
                y = k.masked_lowrank(x, a, b, gate, 2.0, mask, base=base, kernel=kernel)
                grad = torch.randn_like(y)
                grads = torch.autograd.grad(y, leaves, grad)
                leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
                y64 = base.double() + 2.0 * ((leaves64[0] @ (leaves64[1] * mask.double()).T) * leaves64[3]) \
                    @ leaves64[2].T
                grads64 = torch.autograd.grad(y64, leaves64, grad.double())
                for what, got, ref in [("forward", y, y64)] + list(zip(("dx", "dA", "dB", "dgate"), grads, grads64)):
                    err = normwise_error(got.detach(), ref.detach())
                    out.append({"op": f"masked_lowrank[{kernel}] {what}", "tokens": tokens, "d": dim, "r": r,
                                "dtype": name, "error": err, "tolerance": TOLERANCE[name],
                                "ok": err <= TOLERANCE[name]})
    return out


# ----- 2. timings -------------------------------------------------------------------------------
def _optional(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - a baseline that does not import is reported as absent
        return None


def copy_ms(timer: Timer, nbytes: int, device: str) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return timer(lambda: dst.copy_(src))


def time_fwht(k, timer: Timer, device: str, sizes: list[int], total_log2: int, dtypes: list[str]) -> list[dict]:
    dao = _optional("fast_hadamard_transform", "hadamard_transform")  # CUDA, n <= 32768, takes a scale
    rows_out = []
    for log2_n in sizes:
        n, rows = 1 << log2_n, max(1, 1 << (total_log2 - log2_n))
        for name in dtypes:
            x = torch.randn(rows, n, device=device).to(DTYPES[name])
            nbytes = x.numel() * x.element_size()
            scale = n ** -0.5
            row = {"n": n, "rows": rows, "dtype": name, "ours": timer(lambda: k.fwht(x, scale)),
                   "copy": copy_ms(timer, nbytes, device), "torch": timer(lambda: k.fwht_reference(x, scale)),
                   "dao": timer(lambda: dao(x, scale)) if dao is not None and n <= 32768 and device == "cuda"
                   else None}
            row["ours_gbps"] = 2 * nbytes / row["ours"]["median_ms"] / 1e6
            row["of_copy"] = row["copy"]["median_ms"] / row["ours"]["median_ms"]
            rows_out.append(row)
    return rows_out


def time_masked(k, timer: Timer, device: str, shapes: list[tuple[int, int]], ranks: list[int],
                dtype_name: str) -> list[dict]:
    """Forward+backward, the update accumulated into a base output, with all gates on and all gates zero:
    the fused Triton kernel, the default ATen path (``addmm`` into the base output), the plain unfused
    cuBLAS sequence a user would write, and ``addmm_`` in place on the base output."""
    dtype = DTYPES[dtype_name]
    rows_out = []
    for tokens, dim in shapes:
        for r in ranks:
            x, a, b, mask, _ = _masked_inputs(device, tokens, dim, dim, r, dtype)
            x.requires_grad_(True)
            a.requires_grad_(True)
            b.requires_grad_(True)
            base = torch.randn(tokens, dim, device=device, dtype=dtype)
            grad = torch.randn(tokens, dim, device=device, dtype=dtype)
            for gate_value in (1.0, 0.0):
                gate = torch.full((r,), gate_value, device=device, dtype=dtype)

                def triton():
                    return k.masked_lowrank(x, a, b, gate, 2.0, mask, base=base, kernel="triton")

                def aten():
                    return k.masked_lowrank(x, a, b, gate, 2.0, mask, base=base, kernel="aten")

                def unfused():
                    return base + 2.0 * ((x @ (a * mask).T) * gate) @ b.T

                def addmm_():
                    return base.clone().addmm_((x @ (a * mask).T) * gate, b.T, alpha=2.0)

                row = {"tokens": tokens, "d": dim, "r": r, "dtype": dtype_name, "gate": gate_value}
                for label, fn in (("triton", triton), ("aten", aten), ("cublas", unfused), ("addmm_", addmm_)):
                    row[label] = timer(lambda fn=fn: torch.autograd.grad(fn(), (x, a, b), grad))
                fastest = min(("triton", "aten"), key=lambda label: row[label]["median_ms"])
                row["fastest"] = fastest
                rows_out.append(row)
    return rows_out


LLAMA_7B_QV = {"q_proj": (4096, 4096), "v_proj": (4096, 4096)}


def time_fastfood(k, timer: Timer, device: str, r: int, ratio: float, layers: int) -> dict:
    """Factor generation (forward + backward) for every q,v projection of a 7B-shaped model, batched as RLoRA
    does (one chain per distinct L), against the pure-PyTorch chain."""
    rows, ours_total, torch_total = [], 0.0, 0.0
    shapes: dict[tuple[int, int], int] = {}
    for d_in, d_out in LLAMA_7B_QV.values():
        out_dim = r * (d_in + d_out)
        key = (math.ceil(ratio * out_dim), out_dim)
        shapes[key] = shapes.get(key, 0) + layers
    for (d, out_dim), modules in shapes.items():
        z, signs, perm, gauss = _fastfood_inputs(device, modules, d, out_dim)
        z.requires_grad_(True)
        grad = torch.randn(modules, out_dim, device=device)
        ours = timer(lambda: torch.autograd.grad(k.fastfood_project(z, signs, perm, gauss, out_dim,
                                                                    check_perm=False), z, grad))
        ref = timer(lambda: torch.autograd.grad(k.fastfood_reference(z, signs, perm, gauss, out_dim), z, grad))
        ours_total += ours["median_ms"]
        torch_total += ref["median_ms"]
        rows.append({"modules": modules, "d": d, "out_dim": out_dim, "L": signs.shape[1], "ours": ours, "torch": ref})
    return {"r": r, "ratio": ratio, "layers": layers, "groups": rows, "ours_median_ms": ours_total,
            "torch_median_ms": torch_total}


# ----- 3. the run -------------------------------------------------------------------------------
PLANS = {
    "gpu": {"check_fwht": [8, 12, 15, 16, 18], "check_fastfood": [(164, 16384), (1311, 131072)],
            "check_masked": [(512, 4096, 16), (2048, 4096, 64)],
            "fwht": [8, 9, 10, 11, 12, 13, 14, 15], "fwht_total_log2": 26, "fwht_dtypes": ["fp16", "bf16", "fp32"],
            "masked": [(n, d) for n in (512, 2048, 8192) for d in (4096, 8192, 14336)], "ranks": [16, 64],
            "fastfood": (16, 0.01, 32), "timer": (25, 100)},
    "dry": {"check_fwht": [4, 6], "check_fastfood": [(5, 24)], "check_masked": [(8, 16, 4)],
            "fwht": [4, 5], "fwht_total_log2": 7, "fwht_dtypes": ["fp16", "fp32"],
            "masked": [(8, 16)], "ranks": [4], "fastfood": (2, 0.25, 1), "timer": (0, 0)},
}


def environment(device: str) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def run_sections(result: dict, sections: list, budget_s: float, write) -> None:
    """Run ``(name, fn)`` sections in order into ``result["sections"]``; one that would start after ``budget_s``
    seconds is skipped and named in ``result["skipped"]``. ``write(result)`` after each, so a run cut short keeps
    what it finished."""
    start = time.perf_counter()
    for name, fn in sections:
        if time.perf_counter() - start > budget_s:
            result["skipped"].append(name)
            continue
        t0 = time.perf_counter()
        result["sections"][name] = fn()
        result.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        write(result)
    result["seconds"] = round(time.perf_counter() - start, 2)


def run(out_dir: Path, dry_run: bool, budget_s: float) -> dict:
    device = "cpu" if dry_run else "cuda"
    plan = PLANS["dry" if dry_run else "gpu"]
    k = load_kernels()
    timer = Timer(device, *plan["timer"])
    result = {"environment": environment(device), "dry_run": dry_run, "sections": {}, "skipped": []}
    run_sections(result, [
        ("check_fwht", lambda: check_fwht(k, device, plan["check_fwht"])),
        ("check_fastfood", lambda: check_fastfood(k, device, plan["check_fastfood"])),
        ("check_masked", lambda: check_masked(k, device, plan["check_masked"])),
        ("fwht", lambda: time_fwht(k, timer, device, plan["fwht"], plan["fwht_total_log2"], plan["fwht_dtypes"])),
        ("masked", lambda: time_masked(k, timer, device, plan["masked"], plan["ranks"], "bf16")),
        ("fastfood", lambda: time_fastfood(k, timer, device, *plan["fastfood"])),
    ], budget_s, lambda r: _write(out_dir, r))
    checks = [name for name in result["sections"] if name.startswith("check_")]
    result["checks_ok"] = len(checks) == 3 and all(c["ok"] for name in checks for c in result["sections"][name])
    result["foreign_imports"] = sorted(m for m in ("peft", "transformers", "accelerate") if m in sys.modules)
    _write(out_dir, result)
    return result


def _fmt(t: dict | None) -> str:
    return "-" if t is None else f"{t['median_ms']:.4f} ({t['mean_ms']:.4f})"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Kernel run: {env.get('gpu', env['device'])}, {env['date']}",
             "", f"torch {env['torch']}, triton {env['triton']}, Python {env['python']}"
             + (" — **CPU dry run, not a measurement**" if result["dry_run"] else ""),
             "", "Times are ms, median (mean) of `do_bench` samples.", "", "## Numerics against float64", "",
             "| op | shape | dtype | error | tolerance | ok |", "|---|---|---|---|---|---|"]
    for name, rows in result["sections"].items():
        if name.startswith("check_"):
            for c in rows:
                shape = ", ".join(f"{key}={c[key]}" for key in ("n", "d", "out_dim", "tokens", "r") if key in c)
                lines.append(f"| {c['op']} | {shape} | {c['dtype']} | {c['error']:.2e} | {c['tolerance']:.0e} | "
                             f"{'yes' if c['ok'] else '**NO**'} |")
    if "fwht" in result["sections"]:
        lines += ["", "## FWHT (normalised, last dimension)", "",
                  "| n | rows | dtype | ours | copy | of copy | torch | Dao |", "|---|---|---|---|---|---|---|---|"]
        for row in result["sections"]["fwht"]:
            lines.append(f"| {row['n']} | {row['rows']} | {row['dtype']} | {_fmt(row['ours'])} | {_fmt(row['copy'])} "
                         f"| {row['of_copy']:.2f} | {_fmt(row['torch'])} | {_fmt(row['dao'])} |")
    if "masked" in result["sections"]:
        lines += ["", "## Masked low-rank product, forward + backward, output added to a base output", "",
                  "`addmm_` works on a copy of the base output (the bench reuses it); the copy is in its time.", "",
                  "| tokens | d | r | gate | Triton | ATen (default) | cuBLAS unfused | addmm_ | faster of ours |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in result["sections"]["masked"]:
            lines.append(f"| {row['tokens']} | {row['d']} | {row['r']} | {row['gate']:g} | {_fmt(row['triton'])} | "
                         f"{_fmt(row['aten'])} | {_fmt(row['cublas'])} | {_fmt(row['addmm_'])} | {row['fastest']} |")
    if "fastfood" in result["sections"]:
        ff = result["sections"]["fastfood"]
        lines += ["", f"## Fastfood factor generation, q,v of a 7B shape (r={ff['r']}, d = {ff['ratio']:g}·D, "
                  f"{ff['layers']} layers), forward + backward", "",
                  f"ours {ff['ours_median_ms']:.3f} ms, pure PyTorch {ff['torch_median_ms']:.3f} ms (sums of medians)"]
    if result["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(result['skipped'])}"]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, stem: str, result: dict, render) -> None:
    """``stem.json`` and ``stem.md`` (``render(result)``) in ``out_dir``; called after every section, so a run
    cut short keeps what it finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(render(result))


def _write(out_dir: Path, result: dict) -> None:
    write_results(out_dir, "kernels", result, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The GPU run of the peft_lowrank_ext Triton kernels.")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels"), help="folder for JSON + MD")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, tiny sizes (no timing claim)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip sections that start after this")
    parser.add_argument("--report-sm90", action="store_true",
                        help="compile every kernel for H100 (no GPU needed) and write the report")
    parser.add_argument("--report-path", default=str(ROOT / "bench" / "KERNELS_REPORT.md"))
    args = parser.parse_args(argv)
    if args.report_sm90:
        sys.path.insert(0, str(ROOT / "bench"))
        import sm90_report  # a developer tool beside this script, not part of the package

        return sm90_report.main(["--write", args.report_path])
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/kernels_bench.py: no CUDA GPU here; use --dry-run (CPU, tiny sizes) or --report-sm90.")
        return 0
    result = run(Path(args.out), args.dry_run, args.budget_s)
    print(markdown(result))
    return 0 if result["checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
