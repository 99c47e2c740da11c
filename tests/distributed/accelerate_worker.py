"""One replica of an HF ``Trainer`` run launched by ``accelerate launch --num_processes 2 --cpu``.

``accelerate launch ... accelerate_worker.py OUT_DIR`` trains AutoLoRA (its second-order search,
with a different held-out shard on each replica) for a few steps and writes the replica's full
adapter state to ``OUT_DIR/accelerate_rank{r}.pt``; the test requires the files to be identical.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from dp_cases import CASES, LOCAL_BATCH, adapter_state, build_model, held_out_batches, train_batch  # noqa: E402
from peft_lowrank_ext import AutoLoraSearch  # noqa: E402

STEPS = 3


def _dataset(batches) -> Dataset:
    rows = {k: torch.cat([b[k] for b in batches]).tolist() for k in ("input_ids", "attention_mask", "labels")}
    return Dataset.from_dict(rows)


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    case = CASES["autolora"]
    model = build_model(case)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"), use_cpu=True, max_steps=STEPS,
        per_device_train_batch_size=LOCAL_BATCH,
        learning_rate=0.05, save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, seed=0,
        ddp_backend="gloo", dataloader_num_workers=0,
    )
    train = _dataset([train_batch(step, 0, 1) for step in range(STEPS)])
    held_out = _dataset(held_out_batches(rank, world))  # a different shard on each replica
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                      callbacks=[AutoLoraSearch(held_out, batch_size=LOCAL_BATCH)])
    trainer.train()
    assert trainer.accelerator.num_processes == world == 2, (trainer.accelerator.num_processes, world)
    assert trainer.accelerator.state.distributed_type.value == "MULTI_CPU", trainer.accelerator.state.distributed_type
    torch.save(adapter_state(trainer.model, case.prefix), os.path.join(out_dir, f"accelerate_rank{rank}.pt"))


if __name__ == "__main__":
    main()
