"""Registers this package's methods with PEFT on import.

PEFT only accepts names that are already ``PeftType`` members, so each method first gets a real
member (added idempotently, safe on re-import). Prefixes are matched as substrings all over PEFT,
so this module refuses a prefix that overlaps any registered prefix or contains ``lora_``.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .peft_type import extend_str_enum


def ensure_peft_type(name: str) -> PeftType:
    """The ``PeftType`` member for ``name`` (upper-cased), created if missing."""
    return extend_str_enum(PeftType, name.upper(), name.upper())


def check_prefix_is_unique(peft_type: PeftType, prefix: str) -> None:
    """Raise if ``prefix`` could be confused with another method's tensor names."""
    if "lora_" in prefix:
        raise ValueError(f"prefix={prefix!r} is not allowed: it contains 'lora_', which PEFT matches as LoRA's")
    for other_type, other in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_type == peft_type:
            continue
        if prefix in other or other in prefix:
            raise ValueError(
                f"prefix={prefix!r} is not allowed: it overlaps {other!r} of {other_type}; prefixes must not "
                "contain one another"
            )


def register_method(name: str, config_cls, model_cls) -> PeftType:
    """Register one method (idempotent: a second import of the package is a no-op)."""
    peft_type = ensure_peft_type(name)
    prefix = model_cls.prefix
    check_prefix_is_unique(peft_type, prefix)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return peft_type
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"PEFT method {name!r} is already registered by {PEFT_TYPE_TO_TUNER_MAPPING[peft_type]}")
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
