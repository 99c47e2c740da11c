"""AutoLoRA benchmark: the search's cost per hypergradient and β schedule, and what it selects.

On the packaged MiniLM with the bundled data (sequence classification) and on a tiny Llama built
from a config (causal LM, step time only):

* amortised search-step time relative to PEFT LoRA at the same r — the mean over a whole number of
  β periods (``search_every``), so a β step every k optimizer steps is counted once per k steps
  (goal: ≤ 1.3×);
* the ranks each variant selects, their agreement with the authors' setting (``darts_real_step``,
  β every step), and the retrained LoRA's accuracy on the bundled data (synthetic: a smoke check,
  not an accuracy claim — real tasks are in ``bench/real_tasks.py``).

    python bench/autolora.py [--epochs 2] [--json bench/results/autolora.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/autolora.py`: import from the repository root, not from bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from peft_lowrank_ext import AutoLoraConfig, AutoLoraSearch  # noqa: E402
from peft_lowrank_ext.cli.recipes import autolora_search_retrain, peft_config, train_wrapped_classifier  # noqa: E402
from peft_lowrank_ext.train.data import classification_batches, load_text_classification  # noqa: E402
from peft_lowrank_ext.train.models import load_model_and_tokenizer, set_seed  # noqa: E402
from peft_lowrank_ext.train.run import TrainingConfig  # noqa: E402

#: variant name -> (hypergradient, search_every); the first is the authors' setting
VARIANTS = {
    "darts_real_step": ("darts_real_step", 1),
    "darts_virtual_sgd": ("darts_virtual_sgd", 1),
    "first_order": ("first_order", 1),
    "darts_real_step_every10": ("darts_real_step", 10),
    "first_order_every4": ("first_order", 4),
}
TARGETS = ["query", "value"]


def _configs(r: int, targets: list[str], task_type: str | None) -> dict:
    out = {"lora": lambda: LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type)}
    for name, (hypergradient, every) in VARIANTS.items():
        out[name] = (lambda h=hypergradient, k=every: AutoLoraConfig(
            r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type, hypergradient=h, search_every=k))
    return out


def _time_all(build, configs: dict, batches, steps: int, rounds: int = 5) -> dict:
    """Median over ``rounds`` interleaved rounds of each variant's mean step time over ``steps`` optimizer
    steps (a multiple of every β period, so a β step every k steps is counted once per k): interleaving
    spreads machine noise over all variants alike."""
    runs = {}
    for name, make in configs.items():
        model = get_peft_model(build(), make())
        if name != "lora":
            AutoLoraSearch(batches[::-1]).attach(model)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        runs[name] = (model, opt)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # round 0 warms up (and runs each β period once)
        for name, (model, opt) in runs.items():
            t0 = time.perf_counter()
            for i in range(steps):
                model(**batches[i % len(batches)]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if round_:
                times[name].append((time.perf_counter() - t0) / steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def minilm_step_times(data, r: int, steps: int) -> dict:
    net, tok = load_model_and_tokenizer(None, data.num_labels)
    batches = classification_batches(tok, data.train.select(range(256)), 16, 64)

    def build():
        set_seed(0)
        return load_model_and_tokenizer(None, data.num_labels)[0]

    return _time_all(build, _configs(r, ["query", "value"], "SEQ_CLS"), batches, steps)


def llama_step_times(r: int, steps: int) -> dict:
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 1000, (4, 64), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    return _time_all(build, _configs(r, ["q_proj", "v_proj"], None), batches, steps)


def search_and_retrain(data, r: int, epochs: float, variant: str) -> dict:
    """70/30 search on the training set, select, retrain LoRA with the ranks; LoRA at the mean rank."""
    train_cfg = TrainingConfig(epochs=epochs, lr=1e-3, progress=False)

    def train(config, d, name, prepare=None):
        return train_wrapped_classifier(config, d, train_cfg, method=name, prepare=prepare)

    hypergradient, every = VARIANTS[variant]
    common = dict(r=r, lora_alpha=2 * r, target_modules=TARGETS)
    run = autolora_search_retrain(
        peft_config("autolora", **common, hypergradient=hypergradient, search_every=every, arch_lr=1e-2,
                    held_out_fraction=0.3),
        data, train, seed=0, retrain_alpha=2 * r, names=("autolora-search", "autolora-retrain"),
        batches=lambda tok, held: classification_batches(tok, held, 16, train_cfg.max_length))
    search, retrained, ranks = run.search, run.retrain, run.ranks
    mean_rank = sum(ranks.values()) / len(ranks)
    equal_r = max(1, round(mean_rank))
    baseline = train(peft_config("lora", **{**common, "r": equal_r}), data, "lora")
    return {
        "variant": variant,
        "hypergradient": hypergradient,
        "search_every": every,
        "ranks": ranks,
        "mean_rank": mean_rank,
        "search_accuracy": search.accuracy,
        "retrained_accuracy": retrained.accuracy,
        "retrained_trainable_params": retrained.trainable_params,
        "retrained_adapter_bytes": retrained.adapter_bytes,
        "lora_equal_rank": equal_r,
        "lora_equal_rank_accuracy": baseline.accuracy,
        "lora_equal_rank_trainable_params": baseline.trainable_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (a multiple of 4 and 10)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=Path("bench/results/autolora.json"))
    parser.add_argument("--no-runs", action="store_true", help="step times only (no search + retrain runs)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = load_text_classification()
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "minilm_step_s": minilm_step_times(data, args.r, args.steps),
        "llama_step_s": llama_step_times(args.r, args.steps),
        "load_average_start": list(os.getloadavg()),
        "runs": [] if args.no_runs else [search_and_retrain(data, args.r, args.epochs, v) for v in args.variants],
    }
    result["load_average_end"] = list(os.getloadavg())
    authors = next((run for run in result["runs"] if run["variant"] == "darts_real_step"), None)
    for run in result["runs"]:
        if authors is not None:
            same = sum(run["ranks"][m] == authors["ranks"][m] for m in authors["ranks"])
            run["ranks_equal_to_authors_setting"] = f"{same}/{len(authors['ranks'])}"
            run["max_rank_difference"] = max(abs(run["ranks"][m] - authors["ranks"][m]) for m in authors["ranks"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    print(f"AutoLoRA benchmark — {result['machine']}, {result['date']}\n")
    names = list(result["minilm_step_s"])
    print("| model | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for model in ("minilm", "llama"):
        t = result[f"{model}_step_s"]
        print(f"| {model} | " + " | ".join(f"{t[n] * 1e3:.0f} ms ({t[n] / t['lora']:.2f}×)" for n in names) + " |")
    print("\n| variant | mean rank | ranks as authors' setting | retrained acc (synthetic) |")
    print("| --- | --- | --- | --- |")
    for run in result["runs"]:
        print(f"| {run['variant']} | {run['mean_rank']:.2f} | {run.get('ranks_equal_to_authors_setting', '-')} | "
              f"{run['retrained_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
