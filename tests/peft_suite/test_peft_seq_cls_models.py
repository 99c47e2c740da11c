"""PEFT's ``TestSequenceClassificationModels`` (common tests with a classifier head in ``modules_to_save``)
over the four methods, on tiny BERT and RoBERTa classifiers built from configs (offline)."""

import pytest

import peft_upstream
import suite_cases

pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:  # PEFT's tests, fetched once (conftest.py); any failure becomes one failing test, never a skip
    _seq_cls = peft_upstream.load()["test_seq_classifier"]
    TestSeqClsModels = suite_cases.rebuild(
        "TestSeqClsModels", _seq_cls.TestSequenceClassificationModels,
        [("model_id", _seq_cls.PEFT_SEQ_CLS_MODELS_TO_TEST, suite_cases.model_cases(suite_cases.SEQ_CLS_MODELS)),
         ("config_cls,config_kwargs", _seq_cls.ALL_CONFIGS, suite_cases.transformers_config_cases("SEQ_CLS"))],
        module=__name__,
        transformers_class=suite_cases.TinySeqCls,
    )
except Exception as _error:  # noqa: BLE001 - reported in full by the failing test below
    _message = peft_upstream.failure_message(_error)

    def test_peft_common_suite_is_available():
        pytest.fail(_message, pytrace=False)
