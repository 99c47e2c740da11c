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


def config(bound="mcallester", weight=WEIGHT, max_norm=None):
    """``max_norm=None``: the regularizer's gradient is added unclipped, so it can be read off exactly."""
    return RLoraConfig(r=2, intrinsic_dim=12, target_modules=["q_proj", "v_proj"], init_weights=False, init_std=0.3,
                       pac_bayes_weight=weight, pac_bayes_bound=bound, num_train_examples=N, pac_bayes_delta=DELTA,
                       prior_sigma=PRIOR, posterior_sigma=POST, task_type="CAUSAL_LM", pac_bayes_max_grad_norm=max_norm)


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


# ----- clipping the sum (pac_bayes_max_grad_norm) ---------------------------------------------------------
def clipped_reference(grads: dict[str, torch.Tensor], z_before: dict[str, torch.Tensor], max_norm: float):
    """``clip(g + ∇R)`` in float64 from the formulas: ``g·min(1, c / (‖g‖ + 1e-6))`` over every gradient."""
    _, reg = analytic(z_before, "mcallester")
    total = {n: g.double() + reg.get(n, 0.0) for n, g in grads.items()}
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in total.values()))
    coef = min(1.0, max_norm / (norm + 1e-6))
    return {n: t * coef for n, t in total.items()}, norm


def test_default_clips_the_sum_in_a_plain_loop():
    assert RLoraConfig(projection_ratio=0.1).pac_bayes_max_grad_norm == 1.0
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), config(max_norm=0.05))
    z_before = {n: p.detach().clone() for n, p in z_params(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    captured = {}
    opt.register_step_pre_hook(lambda o, a, k: captured.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    inputs = case.inputs()
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    task = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    expected, norm = clipped_reference(task, z_before, 0.05)
    assert norm > 0.5  # clipping is active: the check is not vacuous
    assert captured.keys() == expected.keys()
    for name, want in expected.items():
        torch.testing.assert_close(captured[name].double(), want, atol=1e-7, rtol=1e-5)
    got_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in captured.values()))
    assert got_norm == pytest.approx(0.05, rel=1e-4)


def test_hf_trainer_default_arguments_clip_the_sum(tmp_path):
    """Default TrainingArguments (max_grad_norm=1.0, default optimizer) and the default pac_bayes_max_grad_norm:
    after the step the gradient is clip_1(clip_trainer(g) + ∇R), and its norm is at most 1."""
    case = TINY_MODELS["llama"]
    model = get_peft_model(case.build(), config(max_norm=1.0))
    capture = GradientCapture()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                             dataloader_num_workers=0)
    assert args.max_grad_norm == 1.0
    Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[capture]).train()
    z_before = {n: v for n, v in capture.params_before[0].items() if n.endswith("rlr_z.default")}
    expected, norm = clipped_reference(capture.before[0], z_before, 1.0)
    assert norm > 1.0  # the regularizer pushed the trainer-clipped gradient over the norm: clipping is active
    for name, want in expected.items():
        torch.testing.assert_close(capture.after[0][name].double(), want, atol=1e-7, rtol=1e-5)
    assert math.sqrt(sum(float(g.double().pow(2).sum()) for g in capture.after[0].values())) <= 1.0 + 1e-6


def test_bad_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match=r"RLoraConfig\.pac_bayes_max_grad_norm=0\.0 is not allowed.*\(0\.0, inf\)"):
        RLoraConfig(projection_ratio=0.1, pac_bayes_max_grad_norm=0.0)
