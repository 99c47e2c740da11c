"""The PAC-Bayes regularizer reaches z's gradient by exactly the analytic amount in every training loop."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from peft_lowrank_ext import RLoraConfig, pac_bayes_stats
from peft_lowrank_ext.tuners.rlora.layer import RLoraLayer
from models import TINY_MODELS
from trainer_utils import GradientCapture, lm_dataset, make_tokenizer, text_dataset

N, DELTA, PRIOR, POST, WEIGHT = 100, 0.05, 0.1, 0.01, 3.0


def config(bound="mcallester", weight=WEIGHT):
    return RLoraConfig(r=2, intrinsic_dim=12, target_modules=["q_proj", "v_proj"], init_weights=False, init_std=0.3,
                       pac_bayes_weight=weight, pac_bayes_bound=bound, num_train_examples=N, pac_bayes_delta=DELTA,
                       prior_sigma=PRIOR, posterior_sigma=POST, task_type="CAUSAL_LM")


def analytic(zs: dict[str, torch.Tensor], bound: str) -> tuple[float, dict[str, torch.Tensor]]:
    """KL and ∇_z of the weighted bound, in float64, written from the formulas (independent of the package)."""
    zs = {k: v.double() for k, v in zs.items()}
    d = sum(z.numel() for z in zs.values())
    sq = sum(z.pow(2).sum() for z in zs.values())
    kl = 0.5 * (d * POST**2 / PRIOR**2 + sq / PRIOR**2 - d + d * math.log(PRIOR**2 / POST**2))
    if bound == "mcallester":
        inner = (kl + math.log(2 * math.sqrt(N) / DELTA)) / (2 * N)
        dr_dkl = WEIGHT / (2 * math.sqrt(inner)) / (2 * N)
    else:
        dr_dkl = WEIGHT / N
    return float(kl), {k: dr_dkl * z / PRIOR**2 for k, z in zs.items()}


def z_params(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("rlr_z.default")}


def check_difference(before, after, z_before):
    _, expected = analytic(z_before, "mcallester")
    assert expected
    for name, grad in expected.items():
        diff = (after[name] - before[name]).double()
        assert grad.abs().max() > 1e-4  # the check is not vacuous
        torch.testing.assert_close(diff, grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("bound", ["mcallester", "linear"])
def test_plain_pytorch_loop(bound):
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), config(bound))
    z_before = {n: p.detach().clone() for n, p in z_params(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    captured = {}
    opt.register_step_pre_hook(lambda o, a, k: captured.update({n: p.grad.clone() for n, p in z_params(model).items()}))
    inputs = case.inputs()
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    task = {n: p.grad.clone() for n, p in z_params(model).items()}
    opt.step()
    kl, expected = analytic(z_before, bound)
    for name, grad in expected.items():
        torch.testing.assert_close((captured[name] - task[name]).double(), grad, atol=1e-6, rtol=1e-4)
    stats = pac_bayes_stats(model)
    assert stats["kl"] == pytest.approx(analytic({n: p.detach() for n, p in z_params(model).items()}, bound)[0],
                                        rel=1e-5)


def test_unregularized_model_gets_no_extra_gradient():
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), config(weight=0.0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    captured = {}
    opt.register_step_pre_hook(lambda o, a, k: captured.update({n: p.grad.clone() for n, p in z_params(model).items()}))
    inputs = case.inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    task = {n: p.grad.clone() for n, p in z_params(model).items()}
    opt.step()
    assert all(torch.equal(captured[n], task[n]) for n in task)


def _training_args(tmp_path, cls=TrainingArguments, **extra):
    return cls(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
               optim="sgd", lr_scheduler_type="constant", max_grad_norm=1e9, report_to=[], use_cpu=True,
               save_strategy="no", logging_strategy="no", seed=0, dataloader_num_workers=0, **extra)


def test_hf_trainer(tmp_path):
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), config())
    capture = GradientCapture()
    trainer = Trainer(model=model, args=_training_args(tmp_path), train_dataset=lm_dataset(), callbacks=[capture])
    trainer.train()
    z_before = {n: v for n, v in capture.params_before[0].items() if n.endswith("rlr_z.default")}
    check_difference(capture.before[0], capture.after[0], z_before)


def test_trl_sft_trainer(tmp_path):
    case = TINY_MODELS["llama"]
    capture = GradientCapture()
    args = _training_args(tmp_path, SFTConfig, max_length=16)
    trainer = SFTTrainer(model=case.build(), args=args, train_dataset=text_dataset(), processing_class=make_tokenizer(),
                         peft_config=config(), callbacks=[capture])
    assert any(isinstance(m, RLoraLayer) for m in trainer.model.modules())
    trainer.train()
    z_before = {n: v for n, v in capture.params_before[0].items() if n.endswith("rlr_z.default")}
    assert z_before
    check_difference(capture.before[0], capture.after[0], z_before)
