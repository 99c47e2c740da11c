"""Training-step time and peak memory of each method against PEFT's LoRA, prepared for one GPU run.

The issue's goals on a GPU: RLoRA's and the gated methods' training step on a 1B Llama in bf16 at most
1.10× PEFT LoRA's step time, with no more peak memory; and Fastfood factor generation for a 7B-shaped
model (every q,v projection, r = 16) under 5% of a LoRA training step at batch 8 × 2048 tokens.

``python bench/train_step_bench.py --out DIR`` on a CUDA machine:

1. **1B step.** A Llama-3.2-1B-shaped model (random weights from its config: no hub) in bf16; per method
   a fresh copy of the same weights, adapters on q_proj and v_proj (r = 16, lora_alpha = 32), fused
   AdamW, ``steps`` timed training steps (forward, backward, step, zero_grad; CUDA-synchronised) after
   ``warmup`` steps, and ``torch.cuda.max_memory_allocated`` over them. Each method's own per-step work
   (RLoRA's factor generation, PRILoRA's pruning schedule, HeteroLoRA's scoring, AutoLoRA's bi-level
   search step) runs as it does for a user. AutoLoRA's search does an extra held-out forward/backward per
   step by design, so it is reported, not held to the 1.10× goal; its retrain is the gated layer with
   fixed ranks, which the PRILoRA row bounds from above (same layer, plus pruning).
2. **7B LoRA step, estimated.** A 7B Llama shape cannot be timed whole inside the session's device time:
   the step is timed with 2 and 4 decoder layers; the difference gives the time per layer, and the
   estimate is ``t(2) + 30 · per-layer``. The Fastfood factor generation (forward + backward) of all
   64 q,v modules of the 7B shape (r = 16, d = 1% of the LoRA parameters) is timed on its own and
   reported as a fraction of that estimate.
3. ``train_step.json`` and ``train_step.md`` in ``DIR``, written after each section.

It imports the whole package (PEFT, transformers): on a machine whose versions differ from
``constraints.txt``, install the tested wheels first (``bench/device_run.sh`` does). ``--dry-run`` runs
everything on the CPU with a tiny Llama and a wall-clock timer (the tests run it).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import peft_lowrank_ext  # noqa: E402,F401 - the whole package (registers the methods), before kernels_bench's loader
import kernels_bench  # noqa: E402

METHODS = ("lora", "rlora", "prilora", "heterolora", "autolora_search")
GOAL_TIME, FASTFOOD_GOAL = 1.10, 0.05
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                tie_word_embeddings=True)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                vocab_size=32000, max_position_embeddings=4096)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128)
PLANS = {
    "gpu": {"model": LLAMA_1B, "batch": 8, "seq": 2048, "warmup": 3, "steps": 10, "dtype": torch.bfloat16,
            "big": LLAMA_7B, "big_layers": (2, 4), "big_total_layers": 32, "big_steps": 5, "fastfood_layers": 32, "fastfood_r": 16},
    "dry": {"model": TINY, "batch": 2, "seq": 16, "warmup": 1, "steps": 2, "dtype": torch.float32,
            "big": TINY, "big_layers": (1, 2), "big_total_layers": 4, "big_steps": 2, "fastfood_layers": 1, "fastfood_r": 2},
}
TARGETS = ["q_proj", "v_proj"]


def build_model(shape: dict, layers: int | None, dtype, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype)


def batches(vocab: int, batch: int, seq: int, device: str, count: int, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(4, vocab, (batch, seq), generator=gen).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def peft_config(method: str, steps: int):
    """Each method at r = 16 on q,v, with its defaults otherwise (what a user gets)."""
    from peft import LoraConfig

    from peft_lowrank_ext import AutoLoraConfig, HeteroLoraConfig, PriLoraConfig, RLoraConfig

    common = dict(lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    if method == "lora":
        return LoraConfig(r=16, **common)
    if method == "rlora":
        return RLoraConfig(r=16, projection_ratio=0.01, **common)
    if method == "prilora":
        return PriLoraConfig(r_first=16, r_last=16, total_steps=steps, **common)
    if method == "heterolora":
        return HeteroLoraConfig(r=16, **common)
    return AutoLoraConfig(r=16, **common)


def wrap(method: str, model, data: list[dict], steps: int):
    from peft import get_peft_model

    from peft_lowrank_ext import AutoLoraSearch, HeteroLoraData

    peft_model = get_peft_model(model, peft_config(method, steps))
    if method == "autolora_search":
        AutoLoraSearch(data[:2], batch_size=data[0]["input_ids"].shape[0]).attach(peft_model)
    if method == "heterolora":
        HeteroLoraData(train=data[:2], batch_size=data[0]["input_ids"].shape[0]).attach(peft_model)
    return peft_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(model, data: list[dict], warmup: int, steps: int, device: str) -> dict:
    """Median/mean seconds of a whole training step and the peak memory over the timed steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    model.train()
    samples = []
    for i in range(warmup + steps):
        if i == warmup and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(device)
        start = time.perf_counter()
        loss = model(**data[i % len(data)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(samples), "mean_ms": 1e3 * statistics.fmean(samples),
            "n": len(samples), "peak_bytes": peak, "trainable": sum(p.numel() for p in params)}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def step_1b(plan: dict, device: str, methods=METHODS) -> list[dict]:
    """Every method's step on the same weights and batches, with its ratios to LoRA's (the first row)."""
    rows = []
    data = batches(plan["model"]["vocab_size"], plan["batch"], plan["seq"], device, 4)
    for method in methods:
        model = wrap(method, build_model(plan["model"], None, plan["dtype"], device), data,
                     plan["warmup"] + plan["steps"])
        rows.append({"method": method, **time_steps(model, data, plan["warmup"], plan["steps"], device)})
        del model
        _free(device)
    lora = rows[0]
    for row in rows:
        row["time_vs_lora"] = row["median_ms"] / lora["median_ms"]
        row["peak_vs_lora"] = None if lora["peak_bytes"] is None else row["peak_bytes"] / lora["peak_bytes"]
        row["goal"] = None if row["method"] == "autolora_search" or device != "cuda" else (
            row["time_vs_lora"] <= GOAL_TIME and row["peak_vs_lora"] <= 1.0)
    return rows


def step_7b_estimate(plan: dict, device: str) -> dict:
    """LoRA's step on a 7B shape from two truncated models (see the module docstring), and Fastfood's share."""
    data = batches(plan["big"]["vocab_size"], plan["batch"], plan["seq"], device, 2)
    timed = {}
    for layers in plan["big_layers"]:
        model = wrap("lora", build_model(plan["big"], layers, plan["dtype"], device), data, plan["big_steps"])
        timed[layers] = time_steps(model, data, 1, plan["big_steps"], device)["median_ms"]
        del model
        _free(device)
    (few, t_few), (more, t_more) = sorted(timed.items())
    per_layer = (t_more - t_few) / (more - few)
    estimate = t_few + (plan["big_total_layers"] - few) * per_layer
    k = kernels_bench.load_kernels()
    timer = kernels_bench.Timer(device, *((25, 100) if device == "cuda" else (0, 0)))
    fastfood = kernels_bench.time_fastfood(k, timer, device, plan["fastfood_r"], 0.01, plan["fastfood_layers"])
    return {"timed_layers_ms": timed, "per_layer_ms": per_layer, "lora_step_estimate_ms": estimate,
            "total_layers": plan["big_total_layers"], "fastfood_ms": fastfood["ours_median_ms"],
            "fastfood_share": fastfood["ours_median_ms"] / estimate,
            "goal": None if device != "cuda" else fastfood["ours_median_ms"] / estimate < FASTFOOD_GOAL}


def run(out_dir: Path, dry_run: bool, budget_s: float) -> dict:
    device = "cpu" if dry_run else "cuda"
    plan = PLANS["dry" if dry_run else "gpu"]
    import peft
    import transformers

    result = {"environment": {**kernels_bench.environment(device), "peft": peft.__version__,
                              "transformers": transformers.__version__},
              "dry_run": dry_run, "batch": plan["batch"], "seq": plan["seq"], "sections": {}, "skipped": []}
    kernels_bench.run_sections(result, [("step_1b", lambda: step_1b(plan, device)),
                                        ("step_7b", lambda: step_7b_estimate(plan, device))],
                               budget_s, lambda r: _write(out_dir, r))
    _write(out_dir, result)
    return result


def _goal(value: bool | None, otherwise: str) -> str:
    return otherwise if value is None else ("met" if value else "**missed**")


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Training-step run: {env.get('gpu', env['device'])}, {env['date']}", "",
             f"torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, peft {env['peft']}, "
             f"Python {env['python']}" + (" — **CPU dry run, not a measurement**" if result["dry_run"] else ""),
             "", f"Batch {result['batch']} × {result['seq']} tokens; median (mean) ms of whole training steps."]
    if "step_1b" in result["sections"]:
        lines += ["", "## 1B Llama shape, adapters on q,v (r = 16)", "",
                  "| method | step ms | × LoRA | peak MiB | × LoRA | trainable | goal (≤ 1.10×, ≤ 1.00×) |",
                  "|---|---|---|---|---|---|---|"]
        for row in result["sections"]["step_1b"]:
            goal = _goal(row["goal"], "reported only" if row["method"] == "autolora_search" else "no claim")
            peak_ratio = "-" if row["peak_vs_lora"] is None else f"{row['peak_vs_lora']:.3f}"
            lines.append(f"| {row['method']} | {row['median_ms']:.1f} ({row['mean_ms']:.1f}) | "
                         f"{row['time_vs_lora']:.3f} | {_mib(row['peak_bytes'])} | {peak_ratio} | "
                         f"{row['trainable']:,} | {goal} |")
    if "step_7b" in result["sections"]:
        s = result["sections"]["step_7b"]
        timed = ", ".join(f"{k} layers {v:.1f} ms" for k, v in s["timed_layers_ms"].items())
        lines += ["", "## Fastfood factor generation against a 7B LoRA step (estimated)", "",
                  f"LoRA step timed with {timed}: {s['per_layer_ms']:.1f} ms per layer, estimated "
                  f"{s['lora_step_estimate_ms']:.1f} ms for {s['total_layers']} layers. Fastfood forward + backward "
                  f"for every q,v module: {s['fastfood_ms']:.2f} ms = {100 * s['fastfood_share']:.2f}% of it "
                  f"(goal < {100 * FASTFOOD_GOAL:.0f}%: {_goal(s['goal'], 'no claim')})."]
    if result["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(result['skipped'])}"]
    return "\n".join(lines) + "\n"


def _write(out_dir: Path, result: dict) -> None:
    kernels_bench.write_results(out_dir, "train_step", result, markdown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Training-step time and memory of each method against LoRA.")
    parser.add_argument("--out", default=str(BENCH / "results" / "train_step"), help="folder for JSON + MD")
    parser.add_argument("--dry-run", action="store_true", help="everything on the CPU with a tiny Llama")
    parser.add_argument("--budget-s", type=float, default=240.0, help="skip sections that start after this")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("bench/train_step_bench.py: no CUDA GPU here; use --dry-run.")
        return 0
    result = run(Path(args.out), args.dry_run, args.budget_s)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
