"""One replica of HF ``Trainer`` / TRL ``SFTTrainer`` runs with ``deepspeed=...`` in their arguments, launched by
``torchrun --nproc_per_node 2`` (DeepSpeed's CPU accelerator, gloo). ``sft_CASE`` runs ``SFTTrainer(peft_config=...)``,
which wraps the model itself after the DeepSpeed config exists.

``... deepspeed_trainer_worker.py OUT_DIR [STAGE:CASE ...]`` trains each case with the Trainer's defaults
(its AdamW, lr schedule, clipping to 1.0 — handed to DeepSpeed as ``auto`` values) and writes
``OUT_DIR/trainer_zero{stage}_{case}_rank{r}.pt``: the replica's full adapter state (gathered under
ZeRO-3) or ``{"error": message}``. The tests require identical replicas that trained and ran the method.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datasets import Dataset  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from dp_cases import (  # noqa: E402
    ALL_CASES, LOCAL_BATCH, DEEPSPEED_TRAINER_RUNS, build_model, gathered_adapter_state, held_out_batches,
    train_batch,
)
from peft_lowrank_ext import AutoLoraSearch  # noqa: E402

STEPS = 4


def _dataset(batches) -> Dataset:
    rows = {k: torch.cat([b[k] for b in batches]).tolist() for k in ("input_ids", "attention_mask", "labels")}
    return Dataset.from_dict(rows)


def _train(name: str, stage: int, out_dir: str, rank: int, world: int):
    case = ALL_CASES[name]
    # train_batch_size left out: DeepSpeed derives it (transformers fills "auto" before the process group
    # exists, with world size 1).
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage}}
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"trainer_{stage}_{name}"), max_steps=STEPS,
        per_device_train_batch_size=LOCAL_BATCH, learning_rate=0.01, save_strategy="no", report_to=[],
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, deepspeed=zero,
        accelerator_config={"use_configured_state": True},
    )
    model = build_model(case)  # after the DeepSpeed config exists, as with SFTTrainer(peft_config=...)
    callbacks = [AutoLoraSearch(_dataset(held_out_batches(rank, world)), batch_size=LOCAL_BATCH)] \
        if case.needs_held_out else []
    trainer = Trainer(model=model, args=args, train_dataset=_dataset([train_batch(s, 0, 1) for s in range(STEPS)]),
                      data_collator=default_data_collator, callbacks=callbacks)
    trainer.train()
    assert trainer.accelerator.state.distributed_type.value == "DEEPSPEED", trainer.accelerator.state.distributed_type
    assert trainer.accelerator.num_processes == world == 2, (trainer.accelerator.num_processes, world)
    return gathered_adapter_state(model, case.prefix)


def _train_sft(name: str, stage: int, out_dir: str):
    from trl import SFTConfig, SFTTrainer

    from dp_cases import LLAMA
    from trainer_utils import make_tokenizer, text_dataset

    case = ALL_CASES[name]
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_optimization": {"stage": stage}}
    args = SFTConfig(output_dir=os.path.join(out_dir, f"sft_{stage}_{name}"), max_steps=STEPS,
                     per_device_train_batch_size=LOCAL_BATCH, learning_rate=0.01, save_strategy="no", report_to=[],
                     logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, deepspeed=zero,
                     accelerator_config={"use_configured_state": True}, max_length=16, bf16=False)  # SFTConfig defaults to bf16 (GPU)
    torch.manual_seed(0)
    trainer = SFTTrainer(model=LLAMA.build(), args=args, train_dataset=text_dataset(16), processing_class=make_tokenizer(),
                         peft_config=case.make_config())
    trainer.train()
    assert trainer.accelerator.state.distributed_type.value == "DEEPSPEED", trainer.accelerator.state.distributed_type
    assert trainer.accelerator.num_processes == 2, trainer.accelerator.num_processes
    return gathered_adapter_state(trainer.model, case.prefix)


def main() -> None:
    import torch.distributed as dist

    out_dir, *runs = sys.argv[1:]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # On a machine without CUDA, transformers hands accelerate no process-group backend with DeepSpeed, and
    # accelerate then counts one process (no data sharding, a failing gather). A state set up beforehand with
    # gloo is what accelerate's DeepSpeed launch would give on a GPU machine with nccl.
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    for run in runs or DEEPSPEED_TRAINER_RUNS:
        stage, name = run.split(":")
        try:
            result = (_train_sft(name[4:], int(stage), out_dir) if name.startswith("sft_")
                      else _train(name, int(stage), out_dir, rank, world))
        except Exception as err:  # recorded for the test, which decides whether a refusal is expected
            result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        AcceleratorState._reset_state()  # the next run brings its own DeepSpeed plugin; the process group stays
        torch.save(result, os.path.join(out_dir, f"trainer_zero{stage}_{name}_rank{rank}.pt"))
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main()
