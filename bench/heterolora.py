"""HeteroLoRA benchmark: proxy scoring cost, step time against LoRA at equal budget, and accuracy.

Runs on CPU in a few minutes with the packaged all-MiniLM-L6-v2 (6 blocks, hidden 384). Candidates
are ``query``, ``key``, ``value`` and ``attention.output.dense`` of every block: 24 square 384×384
modules. HeteroLoRA switches on ``budget = 0.25`` of them (6) at ``r = 8``; the equal-budget LoRA
puts ``r = 8 · 0.25 = 2`` on all 24 (the comparison the paper makes), so both train exactly
36,864 adapter parameters (plus the classifier head). Scaling is ``2`` for both (``alpha = 2r``).

1. **Scoring cost.** (a) The automatic scoring window inside training: the extra time the optimizer
   pre-step hook spends per scoring step (``grad_norm``/``snip`` reuse the step's own gradients;
   SynFlow and the alpha test run their own passes). (b) Scoring before training with
   ``heterolora_score`` on ``proxy_batches`` batches (timed on 2, scaled: the cost is linear in the
   number of batches). Both are reported in training steps and as a
   fraction of a training epoch — of the bundled data (800 rows) and of an MRPC-sized epoch
   (3,668 rows), at the benchmark's batch size.
2. **Step time** (forward + backward + AdamW step, hooks included): HeteroLoRA after allocation
   (6 of 24 on), HeteroLoRA with every candidate on (a scoring-window step), LoRA r = 2 on all 24,
   and LoRA r = 8 on the same 6 modules. Models alternate in short rounds so machine load hits all
   alike; medians are reported.
3. **Accuracy** on the bundled review-sentiment data with the shared training loop
   (``peft_lowrank_ext.train.loop.train_classifier``, no HeteroLoRA-specific code: allocation happens
   by itself in the first ``proxy_batches`` steps): LoRA r = 2 on all 24, HeteroLoRA static and
   dynamic with ``grad_norm``, and HeteroLoRA with random allocation (``constant``).

    python bench/heterolora.py [--epochs 3] [--seeds 0] [--out bench/heterolora.json]

Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python bench/heterolora.py`: import from the repository root, not from bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench import common  # noqa: E402

common.offline()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import peft_lowrank_ext  # noqa: E402,F401 - registers HeteroLoRA
from peft_lowrank_ext import HeteroLoraConfig, heterolora_allocation, heterolora_score  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense"]
R, BUDGET = 8, 0.25
MRPC_TRAIN_ROWS = 3668


def _model():
    from peft_lowrank_ext.train.models import load_model_and_tokenizer

    return load_model_and_tokenizer(None, num_labels=2)


def hetero_config(seed: int, **kw) -> HeteroLoraConfig:
    torch.manual_seed(seed)
    kwargs = dict(r=R, lora_alpha=2 * R, target_modules=TARGETS, task_type="SEQ_CLS", budget=BUDGET,
                  proxy="grad_norm", proxy_batches=2, seed=seed)
    kwargs.update(kw)
    return HeteroLoraConfig(**kwargs)


def lora_uniform(seed: int) -> LoraConfig:
    torch.manual_seed(seed)
    r = round(R * BUDGET)
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="SEQ_CLS")


def _batches(tokenizer, n: int, batch: int, seq: int, seed: int = 0):
    from peft_lowrank_ext.train.data import load_text_classification

    data = load_text_classification()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=gen).tolist()
    out = []
    for i in range(n):
        rows = [data.train[j] for j in order[i * batch:(i + 1) * batch]]
        enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=seq,
                        return_tensors="pt")
        out.append({**dict(enc), "labels": torch.tensor([r["label"] for r in rows])})
    return out, len(data.train)


def _adapter_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def _active_adapter_params(model) -> int:
    report = heterolora_allocation(model)
    on = {n for n, v in report["modules"].items() if v["on"]}
    total = 0
    for name, p in model.named_parameters():  # base_model.model.<candidate>.hetlr_{A,B}.default
        module, sep, _ = name.partition(".hetlr_")
        if sep and module.removeprefix("base_model.model.") in on:
            total += p.numel()
    return total


# ----- 1 + 2: scoring cost and step time --------------------------------------------------------------
def timing(rounds: int, steps_per_round: int, batch: int, seq: int, proxy_batches: int) -> dict:
    base, tokenizer = _model()
    batches, train_rows = _batches(tokenizer, 2, batch, seq)
    inputs = batches[0]

    hetero = get_peft_model(copy.deepcopy(base), hetero_config(0))
    heterolora_score(hetero, batches[:2])  # allocate now: 6 of 24 on
    chosen = [n for n, v in heterolora_allocation(hetero)["modules"].items() if v["on"]]
    all_on = get_peft_model(copy.deepcopy(base), hetero_config(0, proxy_batches=10**6))  # stays in its window
    contenders = {
        "heterolora_6of24_r8": hetero,
        "heterolora_all_on_scoring_step": all_on,
        "lora_r2_all_24": get_peft_model(copy.deepcopy(base), lora_uniform(0)),
        "lora_r8_same_6": get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=2 * R, target_modules=chosen,
                                                                           task_type="SEQ_CLS")),
    }
    times = common.interleaved_step_times(contenders, inputs, rounds, steps_per_round)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ref = medians["lora_r2_all_24"]
    params = {name: _adapter_params(m) for name, m in contenders.items()}
    params["heterolora_6of24_r8"] = _active_adapter_params(hetero)
    params["heterolora_all_on_scoring_step"] = _adapter_params(all_on)

    scoring = scoring_cost(base, batches, proxy_batches, medians["heterolora_6of24_r8"], batch, train_rows)
    return {
        "batch": batch, "seq": seq, "steps_timed": rounds * steps_per_round,
        "median_step_s": medians, "ratio_to_lora_r2": {k: v / ref for k, v in medians.items()},
        "adapter_params": params, "allocated_modules": chosen, "scoring": scoring,
    }


def scoring_cost(base, batches, proxy_batches: int, step_s: float, batch: int, train_rows: int) -> dict:
    steps_epoch = {"bundled": math.ceil(train_rows / batch), "mrpc_sized": math.ceil(MRPC_TRAIN_ROWS / batch)}
    out = {"proxy_batches": proxy_batches, "steps_per_epoch": steps_epoch, "training_step_s": step_s, "proxies": {}}
    for proxy in ("grad_norm", "snip", "synflow", "alpha_test"):
        # (a) inside training: the step hooks' extra work on one scoring-window step (an optimizer step at
        # lr 0: the scoring pre-step hook, the post-step counter, and SGD over the head's few gradients).
        model = get_peft_model(copy.deepcopy(base), hetero_config(0, proxy=proxy, proxy_batches=10**6))
        model.train()
        window = []
        for b in batches[:2]:  # the first one warms up
            model(**b).loss.backward()
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
            t0 = time.perf_counter()
            optimizer.step()
            window.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        state = heterolora_allocation(model)
        assert state["step"] == 2 and state["phase"] == "scoring"  # two batches scored, still in the window
        in_window = window[1]
        # (b) before training: heterolora_score, timed on 2 batches and scaled to proxy_batches (it is linear).
        measured = min(proxy_batches, 2)
        model = get_peft_model(copy.deepcopy(base), hetero_config(0, proxy=proxy, proxy_batches=measured))
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            report = heterolora_score(model, batches)
            per_batch = (time.perf_counter() - t0) / measured
        explicit = per_batch * proxy_batches
        row = {
            "window_extra_s_per_step": in_window,
            "window_extra_in_training_steps": in_window / step_s,
            "explicit_s_per_batch": per_batch,
            "explicit_batches_timed": measured,
            "explicit_total_s": explicit,
            "explicit_in_training_steps": explicit / step_s,
            "all_zero_scores": report["history"][0]["all_zero"],  # then the seeded tie-break (the default)
            "fallback_used": report["history"][0]["fallback"],
        }
        for key, steps in steps_epoch.items():
            # The automatic window also spends proxy_batches steps without adapter updates (the head trains).
            row[f"window_extra_fraction_of_epoch_{key}"] = proxy_batches * in_window / (steps * step_s)
            row[f"explicit_fraction_of_epoch_{key}"] = explicit / (steps * step_s)
            row[f"window_steps_fraction_of_epoch_{key}"] = proxy_batches / steps
        out["proxies"][proxy] = row
        print(f"  scoring {proxy}: window +{in_window * 1000:.1f} ms/step, explicit {explicit:.2f} s", file=sys.stderr)
    return out


def captured_targets(_data) -> list[str]:
    """Names of the candidate modules on MiniLM (6 blocks × 4 targets)."""
    return [f"{block}.{t}" for block in range(6) for t in TARGETS]


# ----- 3: accuracy ----------------------------------------------------------------------------------
def accuracy(epochs: float, seeds: list[int], lr: float, batch: int, max_length: int) -> list[dict]:
    from peft_lowrank_ext.train.data import load_text_classification
    from peft_lowrank_ext.train.loop import train_classifier
    from peft_lowrank_ext.train.run import TrainingConfig

    data = load_text_classification()
    rows = []
    steps_epoch = math.ceil(len(data.train) / batch)
    for seed in seeds:
        config = TrainingConfig(epochs=epochs, lr=lr, seed=seed, progress=False, batch_size=batch,
                                max_length=max_length)
        runs = {
            "lora_r2_all_24": lora_uniform(seed),
            "heterolora_static_grad_norm": hetero_config(seed),
            "heterolora_dynamic_grad_norm": hetero_config(seed, mode="dynamic",
                                                          realloc_every=max(1, math.ceil(0.1 * steps_epoch))),
            "heterolora_static_random": hetero_config(seed, proxy="constant"),
        }
        for name, peft_config in runs.items():
            captured = {}
            with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = train_classifier(peft_config, data, config, method=name, output_dir=out)
                if isinstance(peft_config, HeteroLoraConfig):
                    from peft import PeftModel

                    from peft_lowrank_ext.train.models import load_model_and_tokenizer

                    net, _ = load_model_and_tokenizer(None, 2)
                    captured = heterolora_allocation(PeftModel.from_pretrained(net, out))
            row = {"method": name, "seed": seed, "accuracy": result.accuracy, "eval_loss": result.eval_loss,
                   "steps": result.steps, "median_step_s": result.median_step_s,
                   "time_per_step_s": result.time_per_step_s, "train_time_s": result.train_time_s,
                   "trainable_params": result.trainable_params, "adapter_bytes": result.adapter_bytes}
            if captured:
                row["allocations"] = captured["allocations"]
                row["final_on"] = [n for n, v in captured["modules"].items() if v["on"]]
                row["active_adapter_params"] = len(row["final_on"]) * R * 2 * 384  # square 384×384 modules
            else:
                row["active_adapter_params"] = len(captured_targets(data)) * peft_config.r * 2 * 384
            rows.append(row)
            print(f"  {name} seed {seed}: accuracy {result.accuracy:.4f} ({result.train_time_s:.0f} s)",
                  file=sys.stderr)
    return rows


def main(argv=None) -> dict:
    parser = common.method_bench_parser(__doc__.splitlines()[0], __file__, rounds=6,
                                        threads_help="torch threads; 1 is steadier on a small shared machine")
    parser.add_argument("--proxy-batches", type=int, default=32, help="batches scored by heterolora_score")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    print("timing ...", file=sys.stderr)
    t = timing(args.rounds, args.steps_per_round, args.batch, args.seq, args.proxy_batches)
    acc = [] if args.skip_accuracy else accuracy(args.epochs, args.seeds, args.lr, args.batch, args.seq)
    result = {
        "machine": common.machine_brief(),
        "timing": t, "accuracy": acc, "args": vars(args),
    }
    Path(args.out).write_text(json.dumps(result, indent=2))

    print(f"\n### HeteroLoRA vs LoRA (MiniLM-L6, q/k/v/attn-out: 24 candidates, budget {BUDGET}, batch {args.batch} "
          f"× seq {args.seq}, {torch.get_num_threads()} thread(s), {result['machine']['device']})\n")
    print("| run | median step (s) | × LoRA r=2 | adapter params |")
    print("|---|---:|---:|---:|")
    for name, s in t["median_step_s"].items():
        print(f"| {name} | {s:.4f} | {t['ratio_to_lora_r2'][name]:.3f} | {t['adapter_params'][name]:,} |")
    sc = t["scoring"]
    ep = sc["steps_per_epoch"]
    print(f"\nScoring cost (training step {sc['training_step_s'] * 1000:.1f} ms; epoch = {ep['bundled']} steps "
          f"bundled / {ep['mrpc_sized']} steps MRPC-sized; {sc['proxy_batches']} proxy batches):\n")
    print("| proxy | window: extra per step (steps) | window: extra, % of epoch (bundled / MRPC) | "
          "heterolora_score (steps) | heterolora_score, % of epoch (bundled / MRPC) |")
    print("|---|---:|---:|---:|---:|")
    for proxy, row in sc["proxies"].items():
        print(f"| {proxy} | {row['window_extra_in_training_steps']:.3f} | "
              f"{100 * row['window_extra_fraction_of_epoch_bundled']:.1f} / "
              f"{100 * row['window_extra_fraction_of_epoch_mrpc_sized']:.1f} | "
              f"{row['explicit_in_training_steps']:.1f} | {100 * row['explicit_fraction_of_epoch_bundled']:.1f} / "
              f"{100 * row['explicit_fraction_of_epoch_mrpc_sized']:.1f} |")
    print(f"\n(The automatic window also spends its {sc['proxy_batches']} steps without adapter updates: "
          f"{100 * sc['proxy_batches'] / ep['bundled']:.0f}% / {100 * sc['proxy_batches'] / ep['mrpc_sized']:.0f}% "
          "of an epoch at this proxy_batches.)")
    if acc:
        print("\n| method | seed | accuracy | eval loss | steps | active adapter params | allocations |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in acc:
            active = row["active_adapter_params"]
            print(f"| {row['method']} | {row['seed']} | {row['accuracy']:.4f} | {row['eval_loss']:.4f} | "
                  f"{row['steps']} | {active:,} | {row.get('allocations', '–')} |")
    print(f"\nJSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
