"""Cost of RLoRA against PEFT LoRA at the same rank and target modules (CPU by default).

Two models:

* ``minilm``: the packaged pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) as a
  sequence classifier, adapters on ``query``/``value``;
* ``llama1b``: a Llama stack shaped like a 1.1B model (hidden 2048, intermediate 5632, 22 layers,
  32 heads, 4 KV heads, vocabulary 32000), built from a config with random weights, as a causal LM,
  adapters on ``q_proj``/``v_proj``. ``--llama-layers`` builds fewer layers when memory or time is short.

For each (model, method) a fresh worker process (so that peak memory is its own) builds the model,
wraps it with ``get_peft_model`` and reports: trainable parameters, size of the saved
``adapter_model.safetensors``, bytes of AdamW state after one step, resident memory before
training and its peak during the timed steps, and the median time of a full training step
(forward, backward, optimizer step) over ``--steps`` steps after ``--warmup`` untimed ones.

    python bench/rlora_vs_lora.py                     # both models, prints a markdown table
    python bench/rlora_vs_lora.py --models minilm     # the small one only
    python bench/rlora_vs_lora.py --llama-layers 4    # a shallower 1B-wide stack

Results go to ``--output`` (JSON) and the same path with ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# `python bench/rlora_vs_lora.py` puts bench/ first on sys.path, where a file named like an installed
# package (e.g. transformers' optional `kernels`) would shadow it; use the repository root instead
# (also makes an uninstalled checkout importable).
_BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH_DIR]
sys.path.insert(0, str(_BENCH_DIR.parent))

MODELS = ("minilm", "llama1b")
METHODS = ("lora", "rlora")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)


# ----- memory: the package's own readers of /proc/self/status ------------------------------------------
from peft_lowrank_ext.train.loop import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402


# ----- models -------------------------------------------------------------------------------------
def build_minilm():
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from peft_lowrank_ext.train.loop import packaged_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(packaged_model_path(), num_labels=2)
    return model, ["query", "value"], "SEQ_CLS", model.config.vocab_size


def build_llama(layers: int, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_1B, "num_hidden_layers": layers}, torch_dtype=dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # cheap random weights: N(0, 0.02²), norms at 1 (the values do not matter for cost)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    # non-persistent buffers (rotary frequencies) were left uninitialised by to_empty: rebuild that module
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    return model, ["q_proj", "v_proj"], "CAUSAL_LM", config.vocab_size


def peft_config(method: str, r: int, targets: list[str], task_type: str, args):
    if method == "lora":
        from peft import LoraConfig

        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type)
    from peft_lowrank_ext import RLoraConfig

    pac = ({"pac_bayes_weight": args.pac_bayes_weight, "num_train_examples": 1000}
           if args.pac_bayes_weight > 0 else {})
    return RLoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, projection_ratio=args.projection_ratio,
                       task_type=task_type, **pac)


# ----- one measurement ----------------------------------------------------------------------------
def measure(model_name: str, method: str, args) -> dict:
    import torch
    from peft import get_peft_model

    import peft_lowrank_ext  # noqa: F401  (registers RLoRA)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    if model_name == "minilm":
        base, targets, task, vocab = build_minilm()
        batch, seq = args.minilm_batch, args.minilm_seq
    else:
        base, targets, task, vocab = build_llama(args.llama_layers, dtype)
        batch, seq = args.llama_batch, args.llama_seq
    model = get_peft_model(base, peft_config(method, args.r, targets, task, args))
    build_s = time.perf_counter() - t0
    model.train()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["labels"] = torch.randint(0, 2, (batch,), generator=gen) if task == "SEQ_CLS" else ids.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    step()  # the first step allocates the optimizer state
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    for _ in range(max(0, args.warmup - 1)):
        step()
    rss_before = rss_bytes()
    peak_reset = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = peak_rss_bytes()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        adapter_bytes = (Path(tmp) / "adapter_model.safetensors").stat().st_size

    return {
        "model": model_name, "method": method, "targets": targets, "task_type": task, "r": args.r,
        "projection_ratio": args.projection_ratio if method == "rlora" else None,
        "layers": args.llama_layers if model_name == "llama1b" else 6,
        "dtype": args.dtype if model_name == "llama1b" else "float32",
        "batch": batch, "seq_len": seq,
        "total_params": total, "trainable_params": trainable, "adapter_bytes": adapter_bytes,
        "optimizer_state_bytes": opt_bytes,
        "rss_before_train_bytes": rss_before, "peak_rss_train_bytes": peak,
        "peak_is_training_only": peak_reset,
        "step_s_median": statistics.median(times), "step_s_min": min(times), "step_s_all": times,
        "build_s": build_s, "torch_threads": torch.get_num_threads(),
    }


# ----- driver -------------------------------------------------------------------------------------
def markdown(rows: list[dict]) -> str:
    from peft_lowrank_ext.cli.main import human_bytes

    head = ["model", "method", "trainable params", "adapter file", "Adam state", "RSS before train",
            "peak RSS in steps", "step time (median)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":--", ":--"] + ["--:"] * (len(head) - 2)) + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | failed: {r['error'][:80]} |" + " |" * (len(head) - 3))
            continue
        name = r["model"] + (f" ({r['layers']} layers, {r['dtype']})" if r["model"] == "llama1b" else "")
        lines.append("| " + " | ".join([
            name, r["method"], f"{r['trainable_params']:,}", human_bytes(r["adapter_bytes"]),
            human_bytes(r["optimizer_state_bytes"]), human_bytes(r["rss_before_train_bytes"]),
            human_bytes(r["peak_rss_train_bytes"]), f"{1000 * r['step_s_median']:.0f} ms",
        ]) + " |")
    by = {(r["model"], r["method"]): r for r in rows if "error" not in r}
    notes = []
    for m in MODELS:
        a, b = by.get((m, "rlora")), by.get((m, "lora"))
        if a and b:
            notes.append(f"* {m}: RLoRA/LoRA trainable params {a['trainable_params'] / b['trainable_params']:.3f}x, "
                         f"adapter file {a['adapter_bytes'] / b['adapter_bytes']:.3f}x, Adam state "
                         f"{a['optimizer_state_bytes'] / b['optimizer_state_bytes']:.3f}x, step time "
                         f"{a['step_s_median'] / b['step_s_median']:.2f}x")
    return "\n".join(lines + [""] + notes)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="RLoRA vs PEFT LoRA: parameters, adapter size, optimizer state, "
                                            "memory and step time.")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--projection-ratio", type=float, default=0.05)
    p.add_argument("--pac-bayes-weight", type=float, default=0.1,
                   help="RLoRA's regularizer weight, as in the CLI (its per-step cost is included; default 0.1)")
    p.add_argument("--llama-layers", type=int, default=22, help="layers of the 1B-shaped Llama (default 22)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the Llama base weights (MiniLM stays float32)")
    p.add_argument("--minilm-batch", type=int, default=16)
    p.add_argument("--minilm-seq", type=int, default=64)
    p.add_argument("--llama-batch", type=int, default=1)
    p.add_argument("--llama-seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1: allocates Adam state)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", type=Path, default=Path("runs/bench/rlora_vs_lora.json"))
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (peak memory then mixes runs); default: one worker each")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("r", "llama_layers", "minilm_batch", "minilm_seq", "llama_batch", "llama_seq", "steps", "warmup"):
        if getattr(args, name) < 1:
            p.error(f"argument --{name.replace('_', '-')}: must be a positive integer, got {getattr(args, name)}")
    if not 0 < args.projection_ratio <= 1:
        p.error(f"argument --projection-ratio: must be in (0, 1], got {args.projection_ratio}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker, args)))
        return 0

    rows = []
    for model_name in args.models:
        for method in args.methods:
            print(f"[bench] {model_name} / {method} ...", file=sys.stderr, flush=True)
            if args.in_process:
                rows.append(measure(model_name, method, args))
            else:
                cmd = [sys.executable, __file__, *argv, "--worker", model_name, method]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    tail = run.stderr.strip().splitlines()[-1:] or ["no output"]
                    print(run.stderr[-3000:], file=sys.stderr)
                    rows.append({"model": model_name, "method": method, "error": tail[0]})
                else:
                    rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            if "error" not in r:
                print(f"[bench]   {r['trainable_params']:,} trainable, step {1000 * r['step_s_median']:.0f} ms",
                      file=sys.stderr, flush=True)

    import peft
    import torch
    import transformers

    payload = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k != "worker"},
               "environment": {"python": platform.python_version(), "platform": platform.platform(),
                               "torch": torch.__version__, "peft": peft.__version__,
                               "transformers": transformers.__version__, "cpu_count": os.cpu_count()},
               "results": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(rows)
    args.output.with_suffix(".md").write_text(
        "# RLoRA vs PEFT LoRA\n\n" + table + "\n\nSee bench/README.md for what each column measures.\n")
    print(table)
    print(f"\nwrote {args.output} and {args.output.with_suffix('.md')}", file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
