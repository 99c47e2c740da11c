"""The cases PEFT's common tests run over here, and the re-parametrisation of PEFT's test classes.

PEFT's ``TestPeftCustomModel`` and ``TestMultipleActiveAdapters`` (custom models such as ``MLP``),
``TestDecoderModels`` and ``TestSequenceClassificationModels`` parametrise each common test over their own
config and model lists (``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``,
``ALL_CONFIGS``, ``PEFT_*_MODELS_TO_TEST``). :func:`rebuild` copies every test of such a class that is parametrised
over those lists, unchanged, and parametrises it over this package's four methods instead; tests of the class
that are not parametrised over the configs (LoRA-, IA3-, prompt-tuning-specific regression tests) are left out.
"""

from __future__ import annotations

import os
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peft_lowrank_ext import AutoLoraConfig, HeteroLoraConfig, PriLoraConfig, RLoraConfig

CONFIG_CLASSES = {"rlora": RLoraConfig, "autolora": AutoLoraConfig, "prilora": PriLoraConfig,
                  "heterolora": HeteroLoraConfig}
METHOD_OF_CLASS = {cls: name for name, cls in CONFIG_CLASSES.items()}

# Method fields every case of a method gets (beyond targeting): small ranks, and what a method needs to be
# well defined on any model. PRILoRA reads a block index from module names; PEFT's custom models have none, so
# the digit of lin0/lin1/conv1d serves as the block index of a 2-block model (transformers models use the
# default block patterns, see TRANSFORMERS_METHOD_KWARGS).
CUSTOM_METHOD_KWARGS = {
    "rlora": {"r": 2, "projection_ratio": 0.5},
    "autolora": {"r": 4},
    "prilora": {"r_first": 2, "r_last": 4, "block_index_pattern": r"(?:lin|conv)(\d)", "num_blocks": 2,
                "total_steps": 10},  # the pruning schedule is fractions of the run: PEFT's tests train a few steps
    # budget 1.0 keeps every candidate: the allocation is made at wrap time (no scoring window), so the adapter
    # trains from the first step like the other methods. HETEROLORA_SWITCHING below covers switched-off modules.
    "heterolora": {"r": 4, "budget": 1.0},
}
TRANSFORMERS_METHOD_KWARGS = {
    "rlora": {"r": 4, "projection_ratio": 0.25},
    "autolora": {"r": 4, "phase": "selected"},  # see custom_cases
    "prilora": {"r_first": 2, "r_last": 4, "total_steps": 10},
    "heterolora": {"r": 4, "budget": 1.0},
}
# HeteroLoRA with half the candidates switched off (constant proxy: allocated at wrap time).
HETEROLORA_SWITCHING = {"r": 4, "budget": 0.5, "proxy": "constant", "seed": 1}


def custom_cases() -> list:
    """(test_name, model_id, config_cls, config_kwargs) like PEFT's ``TEST_CASES``, for the four methods."""
    cases = []
    for method, cls in CONFIG_CLASSES.items():
        extra = CUSTOM_METHOD_KWARGS[method]
        rows = [
            ("mlp", "MLP", {"target_modules": ["lin0", "lin1"], **extra}),
            ("mlp-modules-to-save", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"], **extra}),
            ("conv1d", "EmbConv1D", {"target_modules": ["conv1d"], **extra}),
        ]
        if method == "autolora":
            # AutoLoRA's search phase refuses an optimizer step without held-out data (AutoLoraSearch), which
            # PEFT's training tests do not attach: the selected phase (ranks fixed) covers those tests.
            rows = [(label, model_id, {**kwargs, "phase": "selected"}) for label, model_id, kwargs in rows]
            rows.append(("mlp-search", "MLP", {"target_modules": ["lin0", "lin1"], **extra}))
        if method == "heterolora":
            rows.append(("mlp-switching", "MLP", {"target_modules": ["lin0", "lin1"], **HETEROLORA_SWITCHING}))
        for label, model_id, kwargs in rows:
            name = f"{method}-{label}"
            cases.append(pytest.param(name, model_id, cls, kwargs, id=name))
    return cases


def multiple_active_adapter_cases() -> list:
    """(test_name, tuner_method, config_cls, kwargs_1, kwargs_2) like PEFT's ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``.

    PEFT checks ``add_weighted_adapter(..., combination_type="cat")`` against two active adapters only for
    ``tuner_method == "lora"``: the gated methods implement "cat" exactly, so they take that path; RLoRA (which
    refuses add_weighted_adapter) runs under its own name.
    """
    cases = []
    for method, cls in CONFIG_CLASSES.items():
        extra = {**CUSTOM_METHOD_KWARGS[method], "init_weights": False}
        tuner_method = "rlora" if method == "rlora" else "lora"
        for label, second in (("same", ["lin0"]), ("different", ["lin1"])):
            name = f"{method}-{label}"
            cases.append(pytest.param(name, tuner_method, cls, {"target_modules": ["lin0"], **extra},
                                      {"target_modules": second, **extra}, id=name))
    return cases


class ConfigFactory:
    """Stands in for a config class in PEFT's tests parametrised over config classes only.

    Those tests build ``config_cls(target_modules=[...])``; RLoRA has no default size for its trainable
    vector (``intrinsic_dim`` or ``projection_ratio`` must be given), so the factory adds the method's
    :data:`CUSTOM_METHOD_KWARGS` (minus PRILoRA's custom block pattern: those tests use ``DeepMLP`` whose
    ``layers.N`` the default pattern reads). Equality and hashing follow the wrapped class, so PEFT's
    ``config_cls == IA3Config``-style checks behave as for the class itself.
    """

    def __init__(self, method: str):
        self.method = method
        self.cls = CONFIG_CLASSES[method]
        self.defaults = {k: v for k, v in CUSTOM_METHOD_KWARGS[method].items()
                         if k not in ("block_index_pattern", "num_blocks")}

    def __call__(self, **kwargs):
        return self.cls(**{**self.defaults, **kwargs})

    def __eq__(self, other):
        return other is self or other is self.cls

    def __hash__(self):
        return hash(self.cls)

    def __repr__(self):
        return f"{self.cls.__name__}(+{self.defaults})"


def config_class_cases() -> list:
    return [pytest.param(ConfigFactory(method), id=method) for method in CONFIG_CLASSES]


# ----- transformers models built from configs (offline) -------------------------------------------------------
# The ids avoid the substrings PEFT's tests use to skip by model name: "gpt2" (methods without Conv1D support;
# ours support it) and "llama"/"gemma3"/"gptj" (check_beft_config, meant for BEFT only but applied to every
# config). A new id must avoid them too, or PEFT silently skips the merge tests for it.
DECODER_MODELS = {
    "tiny-causal-lm-rope": "llama",  # LlamaForCausalLM: nn.Linear q/k/v/o, GQA, RoPE
    "tiny-causal-lm-conv1d": "gpt2",  # GPT2LMHeadModel: transformers' Conv1D (fan_in_fan_out)
}
SEQ_CLS_MODELS = {
    "tiny-seq-cls-bert": "bert",  # BertForSequenceClassification: classifier is an nn.Linear
    "tiny-seq-cls-roberta": "roberta",  # RobertaForSequenceClassification: a head module without .weight
}


class TinyModels:
    """``from_pretrained`` for the ids above: a tiny model built from its config (tests/models.py), the same
    weights on every call (the global RNG is left untouched); a folder path loads a saved model as
    transformers does. Subclasses set the transformers Auto class used for folders."""

    auto_class = AutoModelForCausalLM

    @classmethod
    def from_pretrained(cls, model_id, dtype=None, **kwargs):
        if os.path.isdir(str(model_id)):
            return cls.auto_class.from_pretrained(model_id, dtype=dtype, **kwargs)
        import models  # tests/models.py

        builders = {"llama": models.tiny_llama, "gpt2": models.tiny_gpt2, "bert": models.tiny_bert,
                    "roberta": models.tiny_roberta}
        known = {**DECODER_MODELS, **SEQ_CLS_MODELS}
        if model_id not in known:
            raise ValueError(f"model_id={model_id!r} is not allowed; one of {sorted(known)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = builders[known[model_id]]()
        model.name_or_path = model.config._name_or_path = model_id  # as from_pretrained records it
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()


class TinyCausalLM(TinyModels):
    auto_class = AutoModelForCausalLM


class TinySeqCls(TinyModels):
    auto_class = AutoModelForSequenceClassification


def model_cases(models: dict) -> list:
    return [pytest.param(model_id, id=model_id) for model_id in models]


def transformers_config_cases(task_type: str) -> list:
    return [pytest.param(cls, {"task_type": task_type, "target_modules": None, **TRANSFORMERS_METHOD_KWARGS[method]},
                         id=method)
            for method, cls in CONFIG_CLASSES.items()]


# ----- re-parametrising PEFT's test classes ---------------------------------------------------------------
def _argnames(mark) -> str:
    names = mark.args[0]
    if isinstance(names, (list, tuple)):
        names = ",".join(names)
    return names.replace(" ", "")


def _copy_function(func: types.FunctionType, marks: list) -> types.FunctionType:
    new = types.FunctionType(func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    new.__doc__ = func.__doc__
    new.__qualname__ = func.__qualname__
    new.__module__ = func.__module__
    new.__dict__.update({k: v for k, v in func.__dict__.items() if k != "pytestmark"})
    new.pytestmark = marks
    return new


def rebuild(name: str, upstream: type, replacements: list[tuple[str, list, list]], module: str, **attributes) -> type:
    """A test class with every test of ``upstream`` parametrised over one of the upstream lists in
    ``replacements`` (``(argnames, upstream values, new values)``), parametrised over the new values instead
    (other marks kept); the non-test members of ``upstream`` are kept as they are.

    The test bodies are PEFT's own functions (same code, same module globals); only the parameter lists change.
    """
    body = {"__module__": module, "__doc__": f"PEFT's {upstream.__name__}, parametrised over this package's methods."}
    selected = []
    for attr, value in upstream.__dict__.items():
        if attr.startswith("__"):
            continue
        if not (attr.startswith("test") and callable(value)):
            body[attr] = value
            continue
        replaced = False
        new_marks = []
        for mark in getattr(value, "pytestmark", []):
            new_values = None
            if mark.name == "parametrize":
                for argnames, upstream_values, values in replacements:
                    if _argnames(mark) == argnames.replace(" ", "") and mark.args[1] is upstream_values:
                        new_values = values
            if new_values is None:
                new_marks.append(mark)
            else:
                new_marks.append(pytest.mark.parametrize(mark.args[0], new_values).mark)
                replaced = True
        if replaced:
            body[attr] = _copy_function(value, new_marks)
            selected.append(attr)
    if not selected:
        raise RuntimeError(f"no test of {upstream.__name__} is parametrised over the config lists given; PEFT's "
                           "test layout changed, update tests/peft_suite/suite_cases.py")
    body.update(attributes)
    bases = tuple(b for b in upstream.__bases__ if b is not object) or (object,)
    return type(name, bases, body)
