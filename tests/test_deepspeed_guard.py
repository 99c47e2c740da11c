"""DeepSpeed ZeRO would silently skip every method's per-step work, so wrapping under it is refused."""

from __future__ import annotations

import weakref

import pytest
import transformers.integrations.deepspeed as hf_deepspeed
from peft import LoraConfig, get_peft_model

from methods import METHODS
from models import tiny_llama


class _FakeDeepSpeedConfig:
    config = {"zero_optimization": {"stage": 2}}


@pytest.fixture
def deepspeed_on(monkeypatch):
    holder = _FakeDeepSpeedConfig()
    monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(holder))
    yield holder


@pytest.mark.parametrize("name", sorted(METHODS))
def test_wrapping_under_deepspeed_is_refused(name, deepspeed_on):
    config = METHODS[name].make_config(["q_proj", "v_proj"], "CAUSAL_LM")
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO"):
        get_peft_model(tiny_llama(), config)


def test_plain_lora_still_wraps_under_deepspeed(deepspeed_on):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_wrapping_without_deepspeed_works(name):
    config = METHODS[name].make_config(["q_proj", "v_proj"], "CAUSAL_LM")
    assert get_peft_model(tiny_llama(), config).get_nb_trainable_parameters()[0] > 0
