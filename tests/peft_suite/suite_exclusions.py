"""The one list of PEFT common tests that do not run against this package's methods, each with its reason.

An entry names a PEFT test function, optionally restricted to some methods and to case ids containing one of
``cases`` (the ids of ``suite_cases.py``: e.g. ``autolora-mlp-search``). Excluded tests are reported as skipped
with the reason. A test that PEFT's own code skips for one of our methods must be listed here too, or it fails
(``conftest.py``): every test of PEFT's suite that does not run for a method is accounted for in this list.
"""

from __future__ import annotations

from dataclasses import dataclass

from suite_cases import CONFIG_CLASSES, METHOD_OF_CLASS, ConfigFactory

ALL = tuple(CONFIG_CLASSES)


@dataclass(frozen=True)
class Exclusion:
    tests: tuple[str, ...]  # PEFT test function names
    reason: str
    methods: tuple[str, ...] = ALL
    cases: tuple[str, ...] = ()  # substrings of the case id; empty: every case


PROMPT_LEARNING_ONLY = ("test_prompt_tuning_text_prepare_for_training",
                        "test_prompt_tuning_sample_vocab_prepare_for_training",
                        "test_training_prompt_learning_tasks", "test_set_requires_grad_prompt_learning_raises")

EXCLUSIONS: list[Exclusion] = [
    # --- tests PEFT writes for other kinds of methods (PEFT's own code skips them for ours) -----------------------
    Exclusion(PROMPT_LEARNING_ONLY,
              "prompt-learning only (prompt/prefix tuning): these methods adapt layers, they have no virtual tokens"),
    Exclusion(("test_mixed_adapter_batches", "test_generate_with_mixed_adapter_batches"),
              "PEFT implements mixed-adapter batches (forward(adapter_names=...)) for LoRA only and skips the test for "
              "every other method; these methods do not support adapter_names"),
    Exclusion(("test_weighted_combination_of_adapters",),
              "PEFT's check reads LoRA's/IA3's internals (lora_A/lora_B, svd/ties/dare types) and skips every other "
              "method; add_weighted_adapter (combination_type='cat', refused by RLoRA) is tested in "
              "tests/test_peft_conventions.py"),
    Exclusion(("test_disable_adapter_with_bias_warns",),
              "PEFT restricts this test to LoraConfig/BOFTConfig (it builds their bias option); the warning comes from "
              "PEFT's generic BaseTuner and is checked for bias='all'/'lora_only' in tests/test_peft_conventions.py"),
    Exclusion(("test_active_adapter",),
              "PEFT itself does not support several active adapters with modules_to_save (for any method) and skips",
              cases=("modules-to-save",)),
    # --- behaviours these methods refuse by design ----------------------------------------------------------------
    Exclusion(("test_only_params_are_updated", "test_parameters_after_loading_model", "test_disable_adapters",
               "test_disable_adapters_with_merging"),
              "AutoLoRA's search phase refuses an optimizer step without held-out data (AutoLoraSearch), which "
              "these generic training loops do not attach — silently training plain LoRA would be wrong; the "
              "selected-phase cases run them, and tests/test_autolora.py trains the search phase",
              methods=("autolora",), cases=("mlp-search",)),
    Exclusion(("test_training_custom_models", "test_only_params_are_updated"),
              "HeteroLoRA with budget 0.5: the switched-off candidate gets no gradient by design, while these tests "
              "require every adapter parameter to change (the budget=1.0 cases run them)",
              methods=("heterolora",), cases=("mlp-switching",)),
]


def method_of(item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    config_cls = params.get("config_cls")
    if isinstance(config_cls, ConfigFactory):
        return config_cls.method
    return METHOD_OF_CLASS.get(config_cls)


def exclusion_for(item) -> str | None:
    """The reason ``item`` is excluded, or None if it runs."""
    method = method_of(item)
    case_id = getattr(getattr(item, "callspec", None), "id", "")
    for entry in EXCLUSIONS:
        if item.originalname in entry.tests and method in entry.methods and (
                not entry.cases or any(c in case_id for c in entry.cases)):
            return entry.reason
    return None
