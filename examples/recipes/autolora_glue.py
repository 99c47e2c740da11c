"""AutoLoRA on GLUE with RoBERTa-base: the paper's search → threshold → retrain protocol.

Search: LoRA rank 8 on query/value with selection variables β; the training split is divided 70/30,
A and B train on the 70% (20 epochs, batch 32, Adam lr 3e-4) while β learns on the 30% (Adam lr
3e-4, betas (0.5, 0.999)) at every step. Threshold α_j ≥ 1/r gives each module's rank. Retrain: a
fresh LoRA with those ranks on the whole training split, lora_alpha 16, dropout 0.1, AdamW lr 1e-4,
6% warm-up, batch 16, 30 epochs. Sources: examples/recipes/README.md.

    python examples/recipes/autolora_glue.py --task mrpc          # GPU, hub data
    python examples/recipes/autolora_glue.py --task mrpc --tiny   # same code, tiny, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_common import (device, load_glue, metric_line, output_dir, parser, scratch,  # noqa: E402
                         steps_override, write_results)

from peft_lowrank_ext import AutoLoraConfig  # noqa: E402
from peft_lowrank_ext.cli.recipes import autolora_search_retrain, train_wrapped_classifier  # noqa: E402
from peft_lowrank_ext.train.data import classification_batches  # noqa: E402
from peft_lowrank_ext.train.run import TrainingConfig  # noqa: E402

SEARCH = {"r": 8, "target_modules": ["query", "value"], "held_out_fraction": 0.3, "arch_lr": 3e-4,
          "arch_beta1": 0.5, "arch_beta2": 0.999}
SEARCH_TRAINING = {"epochs": 20, "batch_size": 32, "lr": 3e-4, "weight_decay": 0.0, "warmup_ratio": 0.0}
RETRAIN = {"lora_alpha": 16, "lora_dropout": 0.1}
RETRAIN_TRAINING = {"epochs": 30, "batch_size": 16, "lr": 1e-4, "weight_decay": 0.0, "warmup_ratio": 0.06}


def main(argv=None) -> dict:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    out = output_dir(args, "autolora")
    with scratch() as tmp:
        data, model = load_glue(args, Path(tmp))
        common = dict(max_length=args.max_length, seed=args.seed, device=device(args), **steps_override(args))
        phases = {"autolora-search": TrainingConfig(**SEARCH_TRAINING, **common),
                  "autolora": TrainingConfig(**RETRAIN_TRAINING, **common)}
        search_config = AutoLoraConfig(task_type="SEQ_CLS", **SEARCH)

        def train(config, d, name, prepare):
            return train_wrapped_classifier(config, d, phases[name], model=model, output_dir=out / name,
                                            method=name, prepare=prepare)

        run = autolora_search_retrain(
            search_config, data, train, seed=args.seed, retrain_alpha=RETRAIN["lora_alpha"],
            retrain_overrides={"lora_dropout": RETRAIN["lora_dropout"]},
            batches=lambda tok, held: classification_batches(tok, held, SEARCH_TRAINING["batch_size"],
                                                             args.max_length))
    retrained = run.retrain.peft_model.peft_config["default"]
    protocol = {"search": {**SEARCH, "hypergradient": search_config.hypergradient, "lora_alpha":
                           search_config.lora_alpha, **SEARCH_TRAINING},
                "retrain": {**RETRAIN, **RETRAIN_TRAINING}, "max_length": args.max_length,
                "max_steps_per_phase": common.get("max_steps")}
    del run.retrain.peft_model
    path = write_results(out, "autolora", args, protocol, {
        "search": run.search, "retrain": run.retrain, "ranks": run.ranks,
        "search_rows": run.search_rows, "held_out_rows": run.held_out_rows,
        "retrain_lora": {"r": retrained.r, "rank_pattern": retrained.rank_pattern,
                         "lora_alpha": retrained.lora_alpha, "lora_dropout": retrained.lora_dropout}})
    print(f"autolora {args.task}: ranks {sorted(set(run.ranks.values()))} (mean "
          f"{sum(run.ranks.values()) / len(run.ranks):.2f} of {SEARCH['r']}); retrained LoRA {metric_line(run.retrain)}; "
          f"wrote {path}")
    return {"path": path, "run": run}


if __name__ == "__main__":
    main()
