"""Type and range checks of the fields PEFT itself reads from every config (targeting, tokens, flags).

PEFT does not check these: a wrong type fails later inside injection with a bare ``TypeError``
(``'int' object is not iterable``) or, for a string where a list is expected, silently matches
single characters. Checking them when the config is built gives an error naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from .checks import _fail, _is_int, check_bool, check_choice

# PEFT trains and saves these biases itself (``BaseTuner._mark_only_adapters_as_trainable``,
# ``_get_learnable_bias_state_dict``); 'lora_only' is LoRA's name for "the biases of the adapted layers".
BIAS_CHOICES = ("none", "all", "lora_only")

NAME_LIST = "a non-empty list of module-name strings"


def _is_str_collection(value: Any, *, allow_empty: bool) -> bool:
    return (isinstance(value, (list, tuple, set)) and (allow_empty or len(value) > 0)
            and all(isinstance(v, str) and v for v in value))


def _is_index_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(_is_int(v) and v >= 0 for v in value)


def _check_names_or_regex(owner: str, field: str, value: Any, *, allow_empty: bool) -> None:
    """None, a valid regex string (matched against full module names) or a collection of name suffixes."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as e:
            _fail(owner, field, value, f"a valid regex ({e}) or a list of module names")
        if not value and not allow_empty:
            _fail(owner, field, value, f"None, a non-empty regex string or {NAME_LIST}")
        return
    if not _is_str_collection(value, allow_empty=allow_empty):
        allowed = "a list of module-name strings" if allow_empty else NAME_LIST
        _fail(owner, field, value, f"None, a regex string or {allowed}")


def _check_layers(owner: str, config) -> None:
    value = config.layers_to_transform
    if value is not None and not ((_is_int(value) and value >= 0) or _is_index_list(value)):
        _fail(owner, "layers_to_transform", value, "None, a layer index >= 0 or a non-empty list of such indices")
    pattern = config.layers_pattern
    if pattern is not None and not ((isinstance(pattern, str) and pattern)
                                    or _is_str_collection(pattern, allow_empty=False)):
        _fail(owner, "layers_pattern", pattern, "None, the name of the layer list (e.g. 'layers') or a list of names")


def _check_token_indices(owner: str, value: Any) -> None:
    if value is None or _is_index_list(value):
        return
    if (isinstance(value, dict) and value
            and all(isinstance(k, str) and k and _is_index_list(v) for k, v in value.items())):
        return
    _fail(owner, "trainable_token_indices", value,
          "None, a non-empty list of token indices >= 0, or a dict {embedding module name: such a list}")


def check_shared_fields(config, owner: str) -> None:
    """Raise ``ValueError`` naming the first shared field whose value has the wrong type or range."""
    _check_names_or_regex(owner, "target_modules", config.target_modules, allow_empty=False)
    _check_names_or_regex(owner, "exclude_modules", config.exclude_modules, allow_empty=True)
    modules = config.modules_to_save
    if modules is not None and not _is_str_collection(modules, allow_empty=True):
        _fail(owner, "modules_to_save", modules, "None or a list of module-name strings")
    if isinstance(modules, (tuple, set)):
        config.modules_to_save = list(modules)
    _check_layers(owner, config)
    _check_token_indices(owner, config.trainable_token_indices)
    check_choice(owner, "bias", config.bias, BIAS_CHOICES)
    for flag in ("fan_in_fan_out", "init_weights", "inference_mode"):
        check_bool(owner, flag, getattr(config, flag))
