"""The paths users take first: HF Trainer's default optimizer, fused and 8-bit optimizers, several
optimizers at once, inner modules called on their own.

Fused optimizers (``TrainingArguments().optim`` is fused AdamW) and ``.data`` writes do not bump
``tensor._version``; nothing may depend on it. After training, evaluation, a reloaded adapter,
``merge_and_unload`` and ``export_lora`` must all give the same outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from methods import METHODS
from models import tiny_llama
from aten_ops import aten_calls
from trainer_utils import lm_dataset, make_tokenizer, text_dataset
from peft_lowrank_ext import export_lora, prilora_step
from peft_lowrank_ext.tuners.heterolora import heterolora_allocation

TARGETS = ("q_proj", "v_proj")
ATOL = 2e-6


def _base():
    torch.manual_seed(1234)
    return tiny_llama().eval()


def _wrap(method: str):
    base = _base()
    return get_peft_model(base, METHODS[method].make_config(TARGETS, "CAUSAL_LM"))


def _inputs(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 96, (2, 8), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(**inputs).logits.float().clone()
    finally:
        model.train(was)


def _check_served_equals_saved(model, before: torch.Tensor, tmp_path) -> None:
    """Eval output after training == reloaded adapter == plain-LoRA export == merged model."""
    inputs = _inputs()
    served = _logits(model, inputs)
    assert (served - before).abs().max() > 50 * ATOL, "training did not change the adapter's output"

    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, inputs), served, atol=ATOL, rtol=0)

    export_lora(model, tmp_path / "lora")
    exported = PeftModel.from_pretrained(_base(), tmp_path / "lora")
    torch.testing.assert_close(_logits(exported, inputs), served, atol=ATOL, rtol=0)

    merged = model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, inputs), served, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_default_training_arguments(method, tmp_path):
    """``Trainer`` with default ``TrainingArguments`` (fused AdamW, lr 5e-5): what eval serves is what was saved."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    assert "fused" in args.optim.value, "transformers' default optimizer changed: revisit this test"
    model = _wrap(method)
    before = _logits(model, _inputs())
    Trainer(model=model, args=args, train_dataset=lm_dataset(24),
            callbacks=METHODS[method].trainer_callbacks()).train()
    _check_served_equals_saved(model, before, tmp_path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sft_trainer_defaults(method, tmp_path):
    """TRL ``SFTTrainer`` with default ``SFTConfig`` (fused AdamW) and ``peft_config=``."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4, report_to=[],
                     save_strategy="no", use_cpu=True, disable_tqdm=True, max_length=16)
    assert "fused" in args.optim.value
    trainer = SFTTrainer(model=_base(), args=args, train_dataset=text_dataset(24), processing_class=make_tokenizer(),
                         peft_config=METHODS[method].make_config(TARGETS, "CAUSAL_LM"),
                         callbacks=METHODS[method].trainer_callbacks())
    before = _logits(trainer.model, _inputs())
    trainer.train()
    # SFTConfig defaults to bf16 autocast, which accelerate leaves wrapped around forward: compare in fp32.
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    _check_served_equals_saved(model, before, tmp_path)


def _plain_loop(model, optimizers, steps: int = 4, accumulate: int = 1) -> None:
    data = lm_dataset(steps * accumulate * 4)
    model.train()
    for step in range(steps):
        for micro in range(accumulate):
            rows = data[(step * accumulate + micro) * 4:(step * accumulate + micro + 1) * 4]
            batch = {k: torch.tensor(v) for k, v in rows.items()}
            model(**batch).loss.backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad()
    model.eval()


def _adapter_and_head(model, prefix: str):
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and prefix in n]
    head = [p for n, p in model.named_parameters() if p.requires_grad and prefix not in n]
    return adapter, head


def _needs_held_out(method, model):
    for callback in METHODS[method].trainer_callbacks():
        callback.attach(model)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_plain_loop_with_fused_adamw(method, tmp_path):
    model = _wrap(method)
    _needs_held_out(method, model)
    before = _logits(model, _inputs())
    params = [p for p in model.parameters() if p.requires_grad]
    _plain_loop(model, [torch.optim.AdamW(params, lr=1e-3, fused=True)])
    _check_served_equals_saved(model, before, tmp_path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_plain_loop_with_bitsandbytes_8bit_adamw(method, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model = _wrap(method)
    _needs_held_out(method, model)
    before = _logits(model, _inputs())
    params = [p for p in model.parameters() if p.requires_grad]
    _plain_loop(model, [bnb.optim.AdamW8bit(params, lr=1e-3)])
    _check_served_equals_saved(model, before, tmp_path)


def test_rlora_sees_writes_no_optimizer_made():
    """``.data`` writes, ``load_state_dict`` and ``set_adapter`` all reach what eval serves."""
    model = _wrap("rlora")
    inputs = _inputs()
    first = _logits(model, inputs)
    z = next(p for n, p in model.named_parameters() if "rlr_z" in n)
    z.data.add_(0.3)  # does not bump z._version
    second = _logits(model, inputs)
    assert (second - first).abs().max() > 1e-3

    state = copy.deepcopy(model.state_dict())
    z.data.mul_(-1.0)
    assert (_logits(model, inputs) - second).abs().max() > 1e-3
    model.load_state_dict(state)
    torch.testing.assert_close(_logits(model, inputs), second, atol=0, rtol=0)

    config = METHODS["rlora"].make_config(TARGETS, "CAUSAL_LM")
    model.add_adapter("other", config)
    model.set_adapter("other")
    other = _logits(model, inputs)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, inputs), second, atol=0, rtol=0)
    assert (other - second).abs().max() > 1e-4
    # merge and export use the current z too
    layer = next(m for m in model.modules() if hasattr(m, "rlr_z"))
    delta = layer.get_delta_weight("default").clone()
    z.data.add_(0.1)
    assert (layer.get_delta_weight("default") - delta).abs().max() > 0


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("fused", [True, False])
def test_inner_module_after_forward_and_backward(method, fused):
    """Calling ``get_base_model().model`` after a training step, or between accumulated backward passes."""
    model = _wrap(method)
    _needs_held_out(method, model)
    inner = model.get_base_model().model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    batch = {k: torch.tensor(v) for k, v in lm_dataset(4)[:4].items()}
    model.train()
    model(**batch).loss.backward()
    inner(input_ids=batch["input_ids"]).last_hidden_state.sum().backward()  # gradient accumulation, no step
    opt.step()
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()
    hidden = inner(input_ids=batch["input_ids"]).last_hidden_state
    hidden.sum().backward()
    # the inner call served the current weights: same as the full model's own pass
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states[-1]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(inner(input_ids=batch["input_ids"]).last_hidden_state, full, atol=1e-5, rtol=0)


# ----- one policy step per training step, whatever the number of optimizers ---------------------
def _policy_steps(method: str, model) -> int:
    if method == "prilora":
        return prilora_step(model)
    if method == "heterolora":
        return heterolora_allocation(model)["step"]
    if method == "autolora":
        steps = {int(m._store("beta_step")[a]) for m in model.modules() if hasattr(m, "_store")
                 for a in m._store("beta_step")}
        assert len(steps) == 1
        return steps.pop()
    raise AssertionError(method)


@pytest.mark.parametrize("method", ["prilora", "heterolora", "autolora"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_optimizers_count_one_step_per_training_step(method, accumulate):
    model = _wrap(method)
    _needs_held_out(method, model)
    adapter, head = _adapter_and_head(model, METHODS[method].prefix)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    head = head + [model.get_base_model().lm_head.weight]
    optimizers = [torch.optim.AdamW(head, lr=1e-3), torch.optim.AdamW(adapter, lr=1e-3, fused=True)]
    _plain_loop(model, optimizers, steps=3, accumulate=accumulate)
    assert _policy_steps(method, model) == 3


def test_two_optimizers_rlora_regulariser_added_once(tmp_path):
    """The PAC-Bayes gradient reaches z once per step, also when z is split over two optimizers."""
    from peft_lowrank_ext import RLoraConfig

    def run(split: bool):
        base = _base()
        config = RLoraConfig(r=4, lora_alpha=8, projection_ratio=0.25, target_modules=list(TARGETS),
                             task_type="CAUSAL_LM", init_weights=False, init_std=0.5, seed=3,
                             pac_bayes_weight=1.0, num_train_examples=8)
        model = get_peft_model(base, config)
        zs = [p for n, p in model.named_parameters() if "rlr_z" in n]
        groups = [zs[: len(zs) // 2], zs[len(zs) // 2:]] if split else [zs]
        optimizers = [torch.optim.SGD(g, lr=0.1) for g in groups]
        _plain_loop(model, optimizers, steps=2)
        return torch.cat([z.detach().flatten() for z in zs])

    torch.testing.assert_close(run(split=True), run(split=False), atol=1e-6, rtol=0)



@pytest.mark.parametrize("method", ["rlora", "autolora", "prilora", "heterolora"])
def test_update_accumulates_into_the_base_output(method):
    """On an fp32 base an adapter layer adds its update through the product's own ``addmm`` and scales the
    N×r intermediate (no extra pass over the output, unlike ``base + B A x · s``), and gives what base +
    update added afterwards gives."""
    model = _wrap(method)
    layer = next(m for m in model.modules() if type(m).__name__.endswith("Linear") and hasattr(m, "adapter_add")
                 and m.in_features != m.out_features)  # v_proj: the output's shape is nobody else's
    for m in model.modules():
        if hasattr(m, "set_on"):
            m.set_on("default", True)
    x = torch.randn(2, 8, layer.in_features)
    layer(x)  # RLoRA generates its factors at the first forward
    calls = aten_calls(lambda: layer(x), views=False)
    out_shape = (16, layer.out_features)  # the flattened output: the base GEMM, then the adapter's addmm, no pass else
    assert [name for name, shape in calls if shape == out_shape] == ["mm", "addmm"], calls
    want = layer.base_layer(x) + layer.adapter_update(x, "default")
    assert layer.adapter_update(x, "default").abs().max() > 1e-3  # the adapter is not a no-op here
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
