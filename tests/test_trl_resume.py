"""TRL SFTTrainer trains every method, checkpoints, and resumes to the same state as an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from methods import METHODS
from models import TINY_MODELS
from trainer_utils import make_tokenizer, text_dataset


class StopAfter(TrainerCallback):
    """Interrupts training after a given step (the checkpoint of that step is still written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(method, out_dir, max_steps, callbacks=()):
    case = TINY_MODELS["llama"]
    config = METHODS[method].make_config(case.target_modules, case.task_type)
    args = SFTConfig(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-2,
                     save_strategy="steps", save_steps=2, logging_strategy="no", report_to=[], use_cpu=True, seed=0,
                     max_length=16, dataloader_num_workers=0, gradient_checkpointing=False)
    return SFTTrainer(model=case.build(), args=args, train_dataset=text_dataset(24), processing_class=make_tokenizer(),
                      peft_config=config, callbacks=list(callbacks) + METHODS[method].trainer_callbacks())


def _adapter_state(model, prefix):
    """Every adapter tensor: parameters and persistent buffers (gates, masks, statistics, β moments)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if prefix in n}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_trainer_trains_saves_and_resumes_exactly(method, tmp_path):
    prefix = METHODS[method].prefix
    full = _trainer(method, tmp_path / "full", 4)
    start = _adapter_state(full.model, prefix)
    full.train()
    final = _adapter_state(full.model, prefix)
    assert any(not torch.equal(start[n], final[n]) for n in start), "training changed nothing"

    first = _trainer(method, tmp_path / "resumed", 4, callbacks=[StopAfter(2)])
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = _trainer(method, tmp_path / "resumed", 4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = _adapter_state(resumed.model, prefix)
    assert after.keys() == final.keys()
    for name in final:
        assert torch.equal(after[name], final[name]), name

    # The checkpoint folder is a loadable adapter.
    reloaded = PeftModel.from_pretrained(TINY_MODELS["llama"].build(), tmp_path / "full" / "checkpoint-4")
    for name, value in _adapter_state(reloaded, prefix).items():
        assert torch.equal(value, final[name])
