"""PEFT's ``TestDecoderModels`` (common tests on causal LMs) over the four methods, on tiny Llama and GPT-2
models built from configs (PEFT's own version loads hub checkpoints, which are not reachable offline)."""

import pytest

import peft_upstream
import suite_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:  # PEFT's tests, fetched once (conftest.py); any failure becomes one failing test, never a skip
    _decoder = peft_upstream.load()["test_decoder_models"]
    TestDecoderModels = suite_cases.rebuild(
        "TestDecoderModels", _decoder.TestDecoderModels,
        [("model_id", _decoder.PEFT_DECODER_MODELS_TO_TEST, suite_cases.model_cases(suite_cases.DECODER_MODELS)),
         ("config_cls,config_kwargs", _decoder.ALL_CONFIGS, suite_cases.transformers_config_cases("CAUSAL_LM"))],
        module=__name__,
        transformers_class=suite_cases.TinyCausalLM,
    )
except Exception as _error:  # noqa: BLE001 - reported in full by the failing test below
    _message = peft_upstream.failure_message(_error)

    def test_peft_common_suite_is_available():
        pytest.fail(_message, pytrace=False)
