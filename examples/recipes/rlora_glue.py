"""RLoRA on GLUE with RoBERTa-base: LoRA factors generated from a small trainable vector per module,
with the PAC-Bayes regularizer.

Rank 8 on query/value, trainable size 5% of r·(d_in + d_out) per module (projection_ratio 0.05),
PAC-Bayes weight 0.1 with n = training rows; z at lr 3e-2, the classification head at LoRA's learning
rate. Epochs, batch and warm-up: LoRA's RoBERTa-base GLUE protocol for the task. Sources:
examples/recipes/README.md.

    python examples/recipes/rlora_glue.py --task rte          # GPU, hub data
    python examples/recipes/rlora_glue.py --task rte --tiny   # same code, tiny, seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_common import (LORA_ROBERTA_BASE, device, load_glue, metric_line, output_dir, parser,  # noqa: E402
                         scratch, steps_override, write_results)

from peft_lowrank_ext import RLoraConfig  # noqa: E402
from peft_lowrank_ext.train.loop import train_classifier  # noqa: E402
from peft_lowrank_ext.train.run import TrainingConfig  # noqa: E402

ADAPTER = {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"], "projection_ratio": 0.05,
           "pac_bayes_weight": 0.1}
Z_LR = 3e-2
TRAINING = {"batch_size": 16, "warmup_ratio": 0.06, "weight_decay": 0.0}


def main(argv=None) -> dict:
    args = parser(__doc__.split("\n\n")[0]).parse_args(argv)
    out = output_dir(args, "rlora")
    epochs, head_lr = LORA_ROBERTA_BASE[args.task]
    with scratch() as tmp:
        data, model = load_glue(args, Path(tmp))
        config = RLoraConfig(task_type="SEQ_CLS", seed=args.seed, num_train_examples=len(data.train), **ADAPTER)
        tcfg = TrainingConfig(epochs=epochs, lr=Z_LR, head_lr=head_lr, max_length=args.max_length, seed=args.seed,
                              device=device(args), **TRAINING, **steps_override(args))
        result = train_classifier(config, data, tcfg, model=model, output_dir=out / "adapter", method="rlora")
    del result.peft_model
    protocol = {"adapter": ADAPTER, "training": {"epochs": epochs, "lr_z": Z_LR, "head_lr": head_lr, **TRAINING},
                "max_length": args.max_length}
    path = write_results(out, "rlora", args, protocol, {"rlora": result})
    print(f"rlora {args.task}: {result.trainable_params} trainable parameters; {metric_line(result)}; wrote {path}")
    return {"path": path, "result": result}


if __name__ == "__main__":
    main()
