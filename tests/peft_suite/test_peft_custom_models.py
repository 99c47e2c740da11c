"""PEFT's ``TestPeftCustomModel`` (common tests on PEFT's small custom models) and ``TestMultipleActiveAdapters``
over the four methods."""

import pytest

import peft_upstream
import suite_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:  # PEFT's tests, fetched once (conftest.py); any failure becomes one failing test, never a skip
    _custom = peft_upstream.load()["test_custom_models"]
    TestCustomModels = suite_cases.rebuild(
        "TestCustomModels", _custom.TestPeftCustomModel,
        [("test_name, model_id, config_cls, config_kwargs", _custom.TEST_CASES, suite_cases.custom_cases()),
         ("config_cls", _custom.ALL_PEFT_CONFIG_CLASSES, suite_cases.config_class_cases())],
        module=__name__,
    )
    TestMultipleActiveAdapters = suite_cases.rebuild(
        "TestMultipleActiveAdapters", _custom.TestMultipleActiveAdapters,
        [("test_name, tuner_method, config_cls, config_kwargs_1, config_kwargs_2",
          _custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, suite_cases.multiple_active_adapter_cases())],
        module=__name__,
    )
except Exception as _error:  # noqa: BLE001 - reported in full by the failing test below
    _message = peft_upstream.failure_message(_error)

    def test_peft_common_suite_is_available():
        pytest.fail(_message, pytrace=False)
