"""Compile every Triton kernel configuration for H100 (sm_90) without a GPU and report resources.

Passing the interpreter does not prove a kernel compiles, nor that it fits: this builds each
binary the launchers can use with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (Triton runs
the ``ptxas`` shipped in its wheel; its ``-v`` log gives registers and spills) and reports
registers, spills and shared memory. ``python bench/kernels_bench.py --report-sm90`` (or ``python
bench/sm90_report.py --write FILE``) writes the markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch

SHARED_LIMIT = 232448  # bytes of shared memory one H100 block may use (227 KiB)
_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.int64: "i64", torch.int32: "i32"}


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compilation: a kernel, its pointer types and its constexprs."""

    module: str
    kernel: str
    config: str
    pointer_types: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    int_args: tuple[tuple[str, int], ...] = ()  # sample runtime integers: the JIT specialises on them
    max_registers: int | None = None  # the launch's maxnreg, if it sets one


@dataclasses.dataclass
class CompileResult:
    spec: KernelSpec
    registers: int = -1
    specialisation: str = ""  # runtime args the compile treated as divisible by 16 / constant
    spill_bytes: int = -1
    shared_bytes: int = -1
    seconds: float = 0.0
    error: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# What the launchers can launch.


def _fwht_roles() -> dict[str, tuple[torch.dtype, torch.dtype]]:
    """(input dtype, output dtype) of every transform the launchers run."""
    roles = {f"fwht {_TRITON_TYPES[dt]}": (dt, dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    roles["fastfood"] = (torch.float32, torch.float32)  # all four fused transforms
    return roles


# Sample sizes for the runtime integers (the JIT specialises an int on divisibility by 16): module
# counts, the RLoRA intrinsic dimension d and output length r·(d_in + d_out) of a 7B-shaped layer.
FWHT_ROWS, FASTFOOD_ROWS, FASTFOOD_D, FASTFOOD_OUT = 4096, 7, 1000, 16 * (4096 + 4096)

def fwht_specs(max_log2: int = 24) -> list[KernelSpec]:
    """Every distinct pass binary of ``hadamard_transform`` for lengths 2^4 .. 2^max_log2.

    The fusion switches and ``LOG2_S`` are constexprs, so a binary is fixed by tile shape, stride,
    switches, dtypes, SPLIT and the JIT's integer specialisation at the sample sizes.
    """
    from peft_lowrank_ext.kernels._triton_hadamard import (FUSION_FLAGS, MIN_LOG2, dot_mode, is_half_dot,
                                                           max_registers, plan_passes)

    roles = {name: (dts, ((), ()), FWHT_ROWS, None, None) for name, dts in _fwht_roles().items() if name != "fastfood"}
    # (prologue, epilogue) switches, padded input length d_in and truncated output length d_out.
    fastfood = {"fastfood fwd 1": (("in_mul",), (), FASTFOOD_D, None),
                "fastfood fwd 2": (("gather", "in_mul", "row_scale"), (), None, FASTFOOD_OUT),
                "fastfood bwd 1": (("row_scale",), ("out_mul", "scatter"), FASTFOOD_OUT, None),
                "fastfood bwd 2": ((), ("out_mul",), None, FASTFOOD_D)}
    for name, (prologue, epilogue, d_in, d_out) in fastfood.items():
        roles[name] = (_fwht_roles()["fastfood"], (prologue, epilogue), FASTFOOD_ROWS, d_in, d_out)
    specs: dict[tuple, KernelSpec] = {}
    for role, ((src_dt, dst_dt), (prologue, epilogue), rows, d_in, d_out) in roles.items():
        dot = dot_mode(dst_dt, interpret=False)
        for log2_n in range(MIN_LOG2, max_log2 + 1):
            length = 1 << log2_n
            if (d_in or 0) > length or (d_out or 0) > length:
                continue
            for plan in plan_passes(log2_n, is_half_dot(dot)):
                cfg = plan.config
                src = _TRITON_TYPES[src_dt if plan.first else dst_dt]  # the workspace has dst's dtype
                dst = _TRITON_TYPES[dst_dt]
                on = set(prologue if plan.first else ()) | set(epilogue if plan.last else ())
                flags = {name: name in on for name in FUSION_FLAGS}
                ints = {"n_lines": rows << (log2_n - cfg.log2_m),
                        "in_cols": d_in if plan.first and d_in else length,
                        "out_cols": d_out if plan.last and d_out else length, "LOG2_L": log2_n}
                key = (cfg, plan.log2_s, tuple(flags.values()), src, dst, dot,
                       tuple(v % 16 == 0 or v == 1 for v in ints.values()))
                if key in specs:
                    continue
                ptrs = {"x_ptr": src, "y_ptr": dst, "in_idx_ptr": "i32", "out_idx_ptr": "i32"}
                cx = dict(LOG2_S=plan.log2_s, **flags, LOG2_M=cfg.log2_m, C=cfg.lines, STRIDED=cfg.strided,
                          DOT=dot)
                layout = f"strided S=2^{plan.log2_s}" if cfg.strided else "contiguous"
                fused = "+".join(sorted(on)) or "no fusion"
                cap = max_registers(cfg.log2_m, cfg.strided, dot)
                operands = f"{dst} operands" if is_half_dot(dot) else "split-tf32"
                config = (f"M=2^{cfg.log2_m} {layout} C={cfg.lines} warps={cfg.num_warps}"
                          f"{f' maxnreg={cap}' if cap else ''} {src}->{dst} "
                          f"{operands} {fused} (n=2^{log2_n}, {role})")
                specs[key] = KernelSpec("peft_lowrank_ext.kernels._triton_hadamard", "fwht_pass_kernel", config,
                                        tuple(ptrs.items()), tuple(cx.items()), cfg.num_warps, tuple(ints.items()),
                                        cap)
    return list(specs.values())


def masked_lowrank_specs() -> list[KernelSpec]:
    """Each kernel at each compiled rank width and dot precision, with mask and gate gradient on."""
    from peft_lowrank_ext.kernels import _triton_masked_lowrank as mlr

    specs = []
    kernels = [("masked_lowrank_fwd_kernel", {"BLOCK_K": mlr.BLOCK_K, "HAS_BASE": True}),
               ("masked_lowrank_bwd_rows_kernel", {"BLOCK_K": mlr.BLOCK_K, "GATE_GRAD": True}),
               ("masked_lowrank_bwd_weights_kernel", {})]
    for dtype in (torch.float32, torch.bfloat16):
        dt = _TRITON_TYPES[dtype]
        precision = mlr.dot_precision(torch.empty(0, dtype=dtype))
        ptrs = {name: dt for name in ("x_ptr", "a_ptr", "b_ptr", "y_ptr", "base_ptr", "dy_ptr", "dx_ptr")}
        ptrs["order_ptr"] = "i32"
        for r in (16, mlr.MAX_TRITON_RANK):
            cfg, warps = mlr.rank_config(r), mlr.NUM_WARPS
            for kernel, extra in kernels:
                cx = dict(cfg, HAS_MASK=True, BLOCK_N=mlr.BLOCK_N, BLOCK_D=mlr.BLOCK_D, PRECISION=precision, **extra)
                config = (f"R_PAD={cfg['R_PAD']} widths={[cfg['R_PAD'] >> i for i in range(cfg['LEVELS'] + 1)]} "
                          f"warps={warps} {dt} {precision} mask" + (" dg" if extra.get("GATE_GRAD") else "")
                          + (" +base" if extra.get("HAS_BASE") else ""))
                # An LLM-shaped launch: 4096 tokens, d_in = d_out = 4096, rows_per_split a BLOCK_N multiple.
                ints = dict(N=4096, D_IN=4096, D_OUT=4096, R=r, rows_per_split=8 * mlr.BLOCK_N)
                specs.append(KernelSpec("peft_lowrank_ext.kernels._triton_masked_lowrank", kernel, config,
                                        tuple(ptrs.items()), tuple(cx.items()), warps, tuple(ints.items())))
    return specs


def all_specs() -> list[KernelSpec]:
    return masked_lowrank_specs() + fwht_specs()  # slowest first: balances the worker pool


# ----------------------------------------------------------------------------------------------
# Compilation.


def _signature(fn, spec: KernelSpec) -> dict[str, str]:
    ptrs, cx = dict(spec.pointer_types), dict(spec.constexprs)
    sig = {}
    for name in fn.arg_names:
        if name in cx:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, "fp32")  # fp32 factors, gate, masks and workspaces
        else:
            sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def _ptxas_log(ptx: str) -> str:
    """``ptxas -v`` on the PTX Triton produced (when Triton's own run was skipped by its cache)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
        cmd = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".o"]
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stderr


_DTYPES = {v: k for k, v in _TRITON_TYPES.items()}


def _jit_specialised(fn, spec: KernelSpec, backend):
    """(signature, constexprs, attrs) exactly as ``JITFunction.run`` derives them from real arguments:
    Triton's own binder on 16-byte-aligned sample tensors and the spec's sample integers."""
    from triton.runtime.jit import create_function_from_signature

    ptrs, ints, cx = dict(spec.pointer_types), dict(spec.int_args), dict(spec.constexprs)
    args = []
    for name in fn.arg_names:
        if name in cx:
            continue
        if name.endswith("_ptr"):
            args.append(torch.empty(16, dtype=_DTYPES[ptrs.get(name, "fp32")]))
        elif name in ints:
            args.append(ints[name])
        else:
            args.append(1.5)  # fp32 scalars (scale, out_scale) are not specialised
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(cx, num_warps=spec.num_warps)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs


def _describe(fn, signature, attrs, spec_constexprs) -> str:
    """Runtime arguments the compile assumed divisible by 16 (pointers: 16-byte aligned) or constant."""
    names = list(fn.arg_names)
    div = [names[k[0]] for k, v in attrs.items() if any(a[0] == "tt.divisibility" for a in v)]
    const = [n for n, kind in signature.items() if kind == "constexpr" and n not in dict(spec_constexprs)]
    int_div = [n for n in div if not n.endswith("_ptr")]
    text = f"div16: {', '.join(int_div) or '-'}; aligned ptrs: {sum(n.endswith('_ptr') for n in div)}"
    return text + (f"; const: {', '.join(const)}" if const else "")


def _compile(spec: KernelSpec):
    """``triton.compile`` for sm_90 with the JIT's own specialisation; returns the kernel, the
    ``ptxas -v`` log of its cubin and a description of the specialisation used."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    target = GPUTarget("cuda", 90, 32)
    try:
        signature, constexprs, attrs = _jit_specialised(fn, spec, make_backend(target))
        used = _describe(fn, signature, attrs, spec.constexprs)
    except (ImportError, AttributeError, TypeError, KeyError) as exc:  # another Triton's JIT internals
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
        signature, constexprs = _signature(fn, spec), dict(spec.constexprs)
        used = f"fallback (pointers aligned, no integer specialisation: {type(exc).__name__})"
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    with triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.nvidia.dump_ptxas_log = True  # Triton already runs ptxas -v: keep its log
        options = {"num_warps": spec.num_warps}
        if spec.max_registers is not None:
            options["maxnreg"] = spec.max_registers
        compiled = triton.compile(src, target=target, options=options)
    return compiled, log.getvalue() or _ptxas_log(compiled.asm["ptx"]), used


def compile_spec(spec: KernelSpec) -> CompileResult:
    """Compile one spec for sm_90; never raises (errors are part of the result)."""
    result = CompileResult(spec)
    start = time.perf_counter()
    try:
        compiled, log, result.specialisation = _compile(spec)
        result.registers = int(re.search(r"Used (\d+) registers", log).group(1))
        result.spill_bytes = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
        result.shared_bytes = compiled.metadata.shared
    except Exception as exc:  # noqa: BLE001 - reported, and the test fails on it
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    result.problems = _problems(result)
    return result


def _problems(r: CompileResult) -> list[str]:
    if r.error:
        return [r.error.splitlines()[0]]
    problems = []
    if r.spill_bytes:
        problems.append(f"{r.spill_bytes} bytes of register spills")
    if r.shared_bytes > SHARED_LIMIT:
        problems.append(f"{r.shared_bytes} bytes of shared memory > {SHARED_LIMIT}")
    return problems


def compile_all(specs: list[KernelSpec] | None = None, workers: int | None = None) -> list[CompileResult]:
    specs = all_specs() if specs is None else specs
    workers = workers or os.cpu_count() or 1
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences a warning
    if workers == 1:
        return [compile_spec(s) for s in specs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_spec, specs))


def markdown(results: list[CompileResult]) -> str:
    lines = [
        "# Triton kernels compiled for sm_90 (H100) without a GPU",
        "",
        "Generated by `python bench/kernels_bench.py --report-sm90` (`bench/sm90_report.py`):",
        "`triton.compile` with `GPUTarget(\"cuda\", 90, 32)`, then `ptxas -v` from the Triton wheel.",
        f"Shared memory is Triton's per-block allocation (H100 limit {SHARED_LIMIT} bytes).",
        "Specialisation: the one `JITFunction.run` applies, from Triton's own binder on 16-byte-aligned",
        "sample tensors and sample sizes (FWHT: 4096 rows of n; Fastfood: 7 modules, d = 1000,",
        "out_dim = 16·(4096+4096); masked low-rank: 4096 tokens, d_in = d_out = 4096) — integers divisible",
        "by 16 get `tt.divisibility=16`; constexprs (tile, stride `LOG2_S`, fusion switches) as launched.",
        "",
        "| kernel | config | specialisation | registers | spills (bytes) | shared memory (bytes) | status |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        status = "; ".join(r.problems) or "ok"
        lines.append(f"| {r.spec.kernel} | {r.spec.config} | {r.specialisation} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes} | {status} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="FILE", help="also write the markdown report to FILE")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON (for the tests)")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    results = compile_all(workers=args.workers)
    report = markdown(results)
    print(report)
    if args.write:
        with open(args.write, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f)
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
