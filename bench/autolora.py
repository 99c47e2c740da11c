"""AutoLoRA benchmark: search-step cost vs LoRA, ranks found, retrained accuracy vs LoRA at equal rank.

On the packaged MiniLM with the bundled data (sequence classification) and on a tiny Llama built
from a config (causal LM, step time only):

* search-phase step time relative to PEFT LoRA at the same r (goals: ≤ 2.5× second order,
  ≤ 1.3× first order), median over timed steps after warm-up;
* the ranks the search finds, the retrained adapter's parameter count, and its accuracy against
  LoRA at the same average rank (rounded).

    python bench/autolora.py [--epochs 2] [--json bench/results/autolora.json]
"""

from __future__ import annotations

import argparse
import json
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

TARGETS = ["query", "value"]


def median_step_time(model, batches, steps: int, warmup: int = 2) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def minilm_step_times(data, r: int, steps: int) -> dict:
    net, tok = load_model_and_tokenizer(None, data.num_labels)
    batches = classification_batches(tok, data.train.select(range(256)), 16, 64)
    out = {}
    for name, make in {
        "lora": lambda: LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, task_type="SEQ_CLS"),
        "autolora_first_order": lambda: AutoLoraConfig(r=r, lora_alpha=r, target_modules=TARGETS,
                                                       task_type="SEQ_CLS", hypergradient="first_order"),
        "autolora_second_order": lambda: AutoLoraConfig(r=r, lora_alpha=r, target_modules=TARGETS,
                                                        task_type="SEQ_CLS", hypergradient="second_order"),
    }.items():
        set_seed(0)
        net, _ = load_model_and_tokenizer(None, data.num_labels)
        model = get_peft_model(net, make())
        if name.startswith("autolora"):
            AutoLoraSearch(batches[::-1]).attach(model)
        out[name] = median_step_time(model, batches, steps)
    return out


def llama_step_times(r: int, steps: int) -> dict:
    cfg = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=1000, max_position_embeddings=128)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 1000, (4, 64), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    out = {}
    targets = ["q_proj", "v_proj"]
    for name, make in {
        "lora": lambda: LoraConfig(r=r, lora_alpha=r, target_modules=targets),
        "autolora_first_order": lambda: AutoLoraConfig(r=r, lora_alpha=r, target_modules=targets,
                                                       hypergradient="first_order"),
        "autolora_second_order": lambda: AutoLoraConfig(r=r, lora_alpha=r, target_modules=targets),
    }.items():
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(cfg), make())
        if name.startswith("autolora"):
            AutoLoraSearch(batches[::-1]).attach(model)
        out[name] = median_step_time(model, batches, steps)
    return out


def search_and_retrain(data, r: int, epochs: float, hypergradient: str) -> dict:
    """70/30 search on the training set, select, retrain LoRA with the ranks; LoRA at the mean rank."""
    train_cfg = TrainingConfig(epochs=epochs, lr=1e-3, progress=False)

    def train(config, d, name, prepare=None):
        return train_wrapped_classifier(config, d, train_cfg, method=name, prepare=prepare)

    common = dict(r=r, lora_alpha=r, target_modules=TARGETS)
    run = autolora_search_retrain(
        peft_config("autolora", **common, hypergradient=hypergradient, arch_lr=1e-2, held_out_fraction=0.3),
        data, train, seed=0, retrain_alpha=r, names=("autolora-search", "autolora-retrain"),
        batches=lambda tok, held: classification_batches(tok, held, 16, train_cfg.max_length))
    search, retrained, ranks = run.search, run.retrain, run.ranks
    mean_rank = sum(ranks.values()) / len(ranks)
    equal_r = max(1, round(mean_rank))
    baseline = train(peft_config("lora", **{**common, "r": equal_r}), data, "lora")
    return {
        "hypergradient": hypergradient,
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
    parser.add_argument("--steps", type=int, default=8, help="timed steps per method")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/autolora.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    data = load_text_classification()
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "minilm_step_s": minilm_step_times(data, args.r, args.steps),
        "llama_step_s": llama_step_times(args.r, args.steps),
        "runs": [search_and_retrain(data, args.r, args.epochs, h) for h in ("first_order", "second_order")],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))

    print(f"AutoLoRA benchmark — {result['machine']}, {result['date']}\n")
    print("| model | LoRA step | 1st-order search step | ratio | 2nd-order search step | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in ("minilm", "llama"):
        t = result[f"{model}_step_s"]
        print(f"| {model} | {t['lora'] * 1e3:.1f} ms | {t['autolora_first_order'] * 1e3:.1f} ms | "
              f"{t['autolora_first_order'] / t['lora']:.2f}× | {t['autolora_second_order'] * 1e3:.1f} ms | "
              f"{t['autolora_second_order'] / t['lora']:.2f}× |")
    print("\n| hypergradient | mean rank found | retrained acc | params | LoRA r (equal) acc | params |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in result["runs"]:
        print(f"| {run['hypergradient']} | {run['mean_rank']:.2f} | {run['retrained_accuracy']:.3f} | "
              f"{run['retrained_trainable_params']:,} | r={run['lora_equal_rank']}: "
              f"{run['lora_equal_rank_accuracy']:.3f} | {run['lora_equal_rank_trainable_params']:,} |")
    print("\nranks (second order):", result["runs"][-1]["ranks"])


if __name__ == "__main__":
    main()
