"""Worker of ``tests/test_faults.py``: every method trains, is SIGKILLed after a checkpoint, and resumes.

Usage: ``python tests/faults/kill_resume_worker.py OUT_DIR``

One interpreter start for all methods (imports dominate the cost); each run is a forked child, so every
method's kill hits a real training process of its own. Children use one torch thread, so the reference,
the killed run and the resumed run compute in the same order.

Phase 1 — one child per method trains with HF ``Trainer`` (``save_steps=SAVE_STEPS``). After checkpoint
``SAVE_STEPS`` is written and one more full step has run, it stops in the middle of the next step (after
forward and backward, before the optimizer step) and writes ``OUT/<method>/ready`` holding its pid; the
test sends SIGKILL to that pid. The launcher records how each child ended in ``OUT/<method>/ended_by``.

Phase 2 — one child per method runs the uninterrupted reference, then resumes the killed run from its
checkpoint with ``resume_from_checkpoint``, and saves the final adapter state (every parameter and
buffer of the adapter) of both to ``OUT/<method>/reference.pt`` and ``OUT/<method>/resumed.pt``.
"""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]  # tests/, repo root

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_DISABLED"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

import peft_lowrank_ext  # noqa: E402,F401  (registers the methods)
from peft_lowrank_ext import AutoLoraConfig, AutoLoraSearch, HeteroLoraConfig, PriLoraConfig, RLoraConfig  # noqa: E402
from methods import lm_batches  # noqa: E402
from models import TINY_MODELS  # noqa: E402
from trainer_utils import lm_dataset  # noqa: E402

MAX_STEPS = 8
SAVE_STEPS = 3
BATCH = 4
TRAIN_ROWS = MAX_STEPS * BATCH  # one epoch of MAX_STEPS steps
STALL_LIMIT_S = 300.0  # a child nobody kills gives up (the test then fails on its exit status)
CASE = TINY_MODELS["llama"]
TARGETS = list(CASE.target_modules)


def method_configs():
    """(config, prefix, callbacks factory) per method, each set up so that its state changes after the kill."""
    return {
        "lora": (LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
                 "lora_", list),
        # PAC-Bayes on, with noise injection (random draws after the kill) and a learned posterior sigma.
        "rlora": (RLoraConfig(r=4, lora_alpha=8, projection_ratio=0.25, target_modules=TARGETS, task_type="CAUSAL_LM",
                              seed=3, pac_bayes_weight=0.1, num_train_examples=TRAIN_ROWS, noise_injection=True,
                              learn_posterior_sigma=True),
                  "rlr_", list),
        # Second-order held-out search; 3 held-out batches so that the checkpoint step is not a multiple of it.
        "autolora": (AutoLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                    init_weights=False),
                     "autolr_", lambda: [AutoLoraSearch(lm_batches(3))]),
        # Pruning at every step up to the last: sparsity keeps rising after the kill.
        "prilora": (PriLoraConfig(r_first=2, r_last=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                  init_weights=False, prune_every=1, prune_start=0, prune_end=MAX_STEPS,
                                  final_sparsity=0.5),
                    "prilr_", list),
        # Dynamic: first allocation after step 1, re-allocations after steps 3, 5, 7 (two after the checkpoint).
        "heterolora": (HeteroLoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM",
                                        init_weights=False, budget=0.5, proxy="grad_norm", proxy_batches=1,
                                        mode="dynamic", realloc_every=2),
                       "hetlr_", list),
    }


METHOD_NAMES = tuple(method_configs())


class StallMidStep(TrainerCallback):
    """Signals the test and waits to be killed, in the middle of the step after ``after_step``."""

    def __init__(self, after_step: int, ready_file: str):
        self.after_step = after_step
        self.ready_file = ready_file

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step != self.after_step:
            return
        with open(self.ready_file + ".tmp", "w") as handle:
            handle.write(str(os.getpid()))
        os.replace(self.ready_file + ".tmp", self.ready_file)
        deadline = time.monotonic() + STALL_LIMIT_S
        while time.monotonic() < deadline:
            time.sleep(0.02)
        os._exit(3)


def adapter_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """Every adapter tensor: parameters and persistent buffers (masks, gates, statistics, β moments, z)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if prefix in n}


class CountSteps(TrainerCallback):
    """Counts the optimizer steps a ``train()`` call runs (a resumed run must not start over)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def make_trainer(method: str, out_dir: str, callbacks=(), max_steps: int = MAX_STEPS,
                 save_steps: int = SAVE_STEPS) -> Trainer:
    """HF ``Trainer`` on the tiny Llama: fixed seed, fixed data order, no dropout."""
    config, _, extra_callbacks = method_configs()[method]
    torch.manual_seed(0)
    model = get_peft_model(CASE.build(), config)
    args = TrainingArguments(output_dir=out_dir, max_steps=max_steps, per_device_train_batch_size=BATCH,
                             learning_rate=5e-2, save_strategy="steps", save_steps=save_steps, logging_strategy="no",
                             report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=lm_dataset(TRAIN_ROWS, seq=8),
                   data_collator=default_data_collator, callbacks=list(callbacks) + extra_callbacks())


def train_until_killed(method: str, out: str) -> None:
    trainer = make_trainer(method, os.path.join(out, method, "killed"),
                           callbacks=[StallMidStep(SAVE_STEPS + 1, os.path.join(out, method, "ready"))])
    trainer.train()
    os._exit(4)  # not reached: the test kills the process first


def reference_and_resume(method: str, out: str) -> None:
    prefix = method_configs()[method][1]
    reference = make_trainer(method, os.path.join(out, method, "reference"))
    reference.train()
    torch.save(adapter_state(reference.model, prefix), os.path.join(out, method, "reference.pt"))
    counter = CountSteps()
    resumed = make_trainer(method, os.path.join(out, method, "killed"), callbacks=[counter])
    resumed.train(resume_from_checkpoint=os.path.join(out, method, "killed", f"checkpoint-{SAVE_STEPS}"))
    torch.save(adapter_state(resumed.model, prefix), os.path.join(out, method, "resumed.pt"))
    with open(os.path.join(out, method, "resumed_steps"), "w") as handle:
        handle.write(str(counter.steps))


def _run_children(job, out: str) -> dict[str, int]:
    """Fork one child per method running ``job``; wait for all; the raw wait status per method."""
    pids = {}
    for method in METHOD_NAMES:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                job(method, out)
            except BaseException:  # report and leave the child without running the parent's cleanup
                import traceback

                traceback.print_exc()
                code = 2
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids[method] = pid
    return {method: os.waitpid(pid, 0)[1] for method, pid in pids.items()}


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def main(out: str) -> int:
    torch.set_num_threads(1)
    for method in METHOD_NAMES:
        os.makedirs(os.path.join(out, method), exist_ok=True)
    for method, status in _run_children(train_until_killed, out).items():
        with open(os.path.join(out, method, "ended_by"), "w") as handle:
            handle.write(_describe(status))
        with open(os.path.join(out, method, "checkpoints_at_kill"), "w") as handle:
            handle.write(" ".join(sorted(os.listdir(os.path.join(out, method, "killed")))))
    failed = {m: _describe(s) for m, s in _run_children(reference_and_resume, out).items() if s != 0}
    if failed:
        print(f"reference/resume children failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
