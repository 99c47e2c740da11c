"""PRILoRA benchmark: step time and memory against PEFT LoRA of the same total rank, and accuracy.

Runs on CPU in a few minutes with the packaged all-MiniLM-L6-v2 (6 blocks, hidden 384) on
``query``/``value``:

1. **Step time** (forward + backward + AdamW step, which includes PRILoRA's post-step callback):
   PRILoRA 4 → 12 (ranks 4, 6, 7, 9, 10, 12 per target; total 96 over query and value) against
   LoRA r = 8 (total 96), with pruning every step (the worst case) and every 10 steps. The models
   alternate in short rounds so that load from other processes hits them alike; the ratios of
   median and of fastest steps are reported (goal ≤ 1.1×). PRILoRA's own work (statistics and the
   post-step callback) is also timed alone, which a busy machine disturbs far less.
2. **Memory**: bytes of PRILoRA's statistics (EMA buffer, step counter, the transient per-step sum)
   and of the element masks, against the adapter weights.
3. **Accuracy** on the bundled review-sentiment data (``peft_lowrank_ext/data``) with the shared
   training loop (``peft_lowrank_ext.train.loop.train_classifier``): LoRA r = 8, PRILoRA 4 → 12
   (equal average rank) with pruning, and PRILoRA 4 → 12 without pruning (ranks only).

    python bench/prilora.py [--epochs 3] [--seeds 0] [--out bench/prilora.json]

Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python bench/prilora.py`: import from the repository root, not from bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench import common  # noqa: E402

common.offline()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peft_lowrank_ext  # noqa: E402,F401 - registers PRILoRA
from peft_lowrank_ext import PriLoraConfig, prilora_ranks  # noqa: E402
from peft_lowrank_ext.tuners.prilora import PriLoraLayer  # noqa: E402

TARGETS = ["query", "value"]
ALPHA = 16.0


def _model():
    from peft_lowrank_ext.train.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None, num_labels=2)
    return model, tokenizer


def _lora(seed: int):
    torch.manual_seed(seed)
    return LoraConfig(r=8, lora_alpha=ALPHA, target_modules=TARGETS, task_type="SEQ_CLS")


def _prilora(seed: int, total_steps: int, prune: bool = True, prune_every: int | None = None):
    torch.manual_seed(seed)
    every = prune_every or max(1, total_steps // 30)
    return PriLoraConfig(r_first=4, r_last=12, lora_alpha=ALPHA, target_modules=TARGETS, task_type="SEQ_CLS",
                         prune_every=every, prune_start=total_steps // 10, prune_end=max(total_steps // 10 + 1,
                                                                                          int(0.7 * total_steps)),
                         final_sparsity=0.5 if prune else 0.0)


# ----- 1. step time ---------------------------------------------------------------------------------
def time_steps(rounds: int, steps_per_round: int, batch: int, seq: int) -> dict:
    base, _ = _model()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (batch,))}
    contenders = {
        "lora_r8": _lora(0),
        "prilora_4to12_prune_every_10": _prilora(0, 10_000, prune_every=10),
        "prilora_4to12_prune_every_step": _prilora(0, 10_000, prune_every=1),
    }
    for config in contenders.values():  # pruning active during the whole timing
        if isinstance(config, PriLoraConfig):
            config.prune_start, config.prune_end = 0, 10_000
    import copy

    models = {name: get_peft_model(copy.deepcopy(base), config) for name, config in contenders.items()}
    times = common.interleaved_step_times(models, inputs, rounds, steps_per_round)
    medians = {name: statistics.median(t) for name, t in times.items()}
    minima = {name: min(t) for name, t in times.items()}  # the least disturbed step: steadier under load
    ref = medians["lora_r8"]
    trainable = {name: sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and "classifier" not in n)
                 for name, m in models.items()}
    ranks = prilora_ranks(models["prilora_4to12_prune_every_10"])
    overhead = own_overhead(models["prilora_4to12_prune_every_step"], batch, seq)
    return {
        "own_overhead_ms": overhead,
        "own_overhead_fraction_of_lora_step": {k: v / 1000 / ref for k, v in overhead.items()},
        "batch": batch, "seq": seq, "steps_timed": rounds * steps_per_round,
        "median_step_s": medians, "ratio_to_lora": {k: v / ref for k, v in medians.items()},
        "min_step_s": minima, "min_ratio_to_lora": {k: v / minima["lora_r8"] for k, v in minima.items()},
        "adapter_params": trainable, "prilora_ranks": ranks, "prilora_total_rank": sum(ranks.values()),
        "lora_total_rank": 8 * len(ranks),
        "memory": memory(models["prilora_4to12_prune_every_10"]),
    }


def own_overhead(model, batch: int, seq: int, repeats: int = 20) -> dict:
    """PRILoRA's own work per optimizer step, timed alone (less sensitive to machine load than whole steps)."""
    from peft_lowrank_ext.tuners.prilora import prilora_post_step

    root = model.base_model.model
    layers = [m for m in root.modules() if isinstance(m, PriLoraLayer)]
    xs = [torch.randn(batch, seq, m.in_features) for m in layers]
    model.train()

    def observe():
        t0 = time.perf_counter()
        for layer, x in zip(layers, xs):
            layer.observe_input(x)
        return time.perf_counter() - t0

    def post(prune: bool):
        model.peft_config["default"].prune_every = 1 if prune else 10**9  # the layers hold this very config
        observe()
        t0 = time.perf_counter()
        prilora_post_step(root)
        return time.perf_counter() - t0

    obs = statistics.median(observe() for _ in range(repeats))
    for layer in layers:
        layer.pending_statistics().clear()
    with_prune = statistics.median(post(True) for _ in range(repeats))
    without = statistics.median(post(False) for _ in range(repeats))
    return {"statistics_per_forward": 1000 * obs, "post_step_with_pruning": 1000 * with_prune,
            "post_step_without_pruning": 1000 * without}


# ----- 2. memory ----------------------------------------------------------------------------------
def memory(model) -> dict:
    """Bytes of PRILoRA's own state, read from the adapter's saved tensors by name."""
    sizes = {"statistics_bytes": 0, "mask_bytes": 0, "adapter_weight_bytes": 0}
    kinds = {"prilr_in_sq_ema": "statistics_bytes", "prilr_step": "statistics_bytes",
             "prilr_element_mask": "mask_bytes", "prilr_A": "adapter_weight_bytes", "prilr_B": "adapter_weight_bytes"}
    for name, t in model.state_dict().items():
        kind = next((v for k, v in kinds.items() if f".{k}." in name), None)
        if kind is not None:
            sizes[kind] += t.numel() * t.element_size()
    # transient fp32 Σx² between a forward pass and the optimizer step, one per adapted layer input
    sizes["pending_statistics_bytes"] = sum(4 * m.in_features for m in model.modules() if isinstance(m, PriLoraLayer))
    return sizes


# ----- 3. accuracy --------------------------------------------------------------------------------
def accuracy(epochs: float, seeds: list[int], lr: float) -> list[dict]:
    from peft_lowrank_ext.train.data import load_text_classification
    from peft_lowrank_ext.train.loop import train_classifier
    from peft_lowrank_ext.train.run import TrainingConfig

    data = load_text_classification()
    rows = []
    for seed in seeds:
        config = TrainingConfig(epochs=epochs, lr=lr, seed=seed, progress=False)
        total_steps = int(epochs * -(-len(data.train) // config.batch_size))
        runs = {
            "lora_r8": _lora(seed),
            "prilora_4to12_pruned": _prilora(seed, total_steps, prune=True),
            "prilora_4to12_unpruned": _prilora(seed, total_steps, prune=False),
        }
        for name, peft_config in runs.items():
            with tempfile.TemporaryDirectory() as out:
                result = train_classifier(peft_config, data, config, method=name, output_dir=out)
                saved = load_file(Path(out) / "adapter_model.safetensors")
            masks = [t for k, t in saved.items() if "element_mask" in k]
            row = {"method": name, "seed": seed, "accuracy": result.accuracy, "eval_loss": result.eval_loss,
                   "steps": result.steps, "median_step_s": result.median_step_s,
                   "trainable_params": result.trainable_params, "adapter_bytes": result.adapter_bytes}
            if isinstance(peft_config, PriLoraConfig):
                row["final_mask_sparsity"] = float(sum((m == 0).sum() for m in masks) / sum(m.numel() for m in masks))
                row["schedule"] = {k: getattr(peft_config, k) for k in ("prune_start", "prune_end", "prune_every",
                                                                        "final_sparsity")}
            rows.append(row)
            print(f"  {name} seed {seed}: accuracy {result.accuracy:.4f} ({result.train_time_s:.0f} s)",
                  file=sys.stderr)
    return rows


def main(argv=None) -> dict:
    parser = common.method_bench_parser(
        __doc__.splitlines()[0], __file__, rounds=12,
        threads_help="torch threads; 1 is steadier on a small shared machine (2 threads oversubscribe it)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    print("timing steps ...", file=sys.stderr)
    timing = time_steps(args.rounds, args.steps_per_round, args.batch, args.seq)
    acc = [] if args.skip_accuracy else accuracy(args.epochs, args.seeds, args.lr)
    result = {
        "machine": common.machine_brief(),
        "timing": timing, "accuracy": acc, "args": vars(args),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"\n### PRILoRA vs LoRA (MiniLM-L6, query/value, batch {args.batch} × seq {args.seq}, "
          f"{torch.get_num_threads()} threads, {result['machine']['device']})\n")
    print("| run | median step (s) | × LoRA (median) | fastest step (s) | × LoRA (fastest) | adapter params |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in timing["median_step_s"].items():
        print(f"| {name} | {t:.4f} | {timing['ratio_to_lora'][name]:.3f} | {timing['min_step_s'][name]:.4f} | "
              f"{timing['min_ratio_to_lora'][name]:.3f} | {timing['adapter_params'][name]:,} |")
    oh = timing["own_overhead_ms"]
    frac = timing["own_overhead_fraction_of_lora_step"]
    print(f"\nPRILoRA's own work, timed alone: statistics {oh['statistics_per_forward']:.2f} ms per forward "
          f"({100 * frac['statistics_per_forward']:.2f}% of a LoRA step); post-step callback "
          f"{oh['post_step_without_pruning']:.2f} ms without / {oh['post_step_with_pruning']:.2f} ms with a pruning "
          f"event ({100 * frac['post_step_with_pruning']:.2f}%).")
    mem = timing["memory"]
    print(f"\nTotal rank: PRILoRA {timing['prilora_total_rank']} (ranks per block "
          f"{sorted(set(timing['prilora_ranks'].values()))}), LoRA {timing['lora_total_rank']}.")
    print(f"Memory: statistics {mem['statistics_bytes']:,} B persistent + {mem['pending_statistics_bytes']:,} B "
          f"transient; masks {mem['mask_bytes']:,} B; adapter weights {mem['adapter_weight_bytes']:,} B.")
    if acc:
        print("\n| method | seed | accuracy | eval loss | steps | A sparsity at end |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in acc:
            sparsity = f"{row['final_mask_sparsity']:.3f}" if "final_mask_sparsity" in row else "–"
            print(f"| {row['method']} | {row['seed']} | {row['accuracy']:.4f} | {row['eval_loss']:.4f} | "
                  f"{row['steps']} | {sparsity} |")
    print(f"\nJSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
