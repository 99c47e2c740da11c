"""Add a member to an existing ``str``-valued Enum (PEFT's ``PeftType``).

PEFT's ``register_peft_method`` only accepts names that are already ``PeftType`` members, and an
Enum cannot be subclassed to add one. A plugin therefore has to grow the enum in place. This module
uses only the standard library so the same code can be tested on every supported Python version.
"""

from __future__ import annotations

import enum


def extend_str_enum(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Return ``enum_cls[name]``, creating it with ``value`` if missing (idempotent).

    Raises ``ValueError`` if ``name`` exists with another value, or ``value`` is taken by another name.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}, not {value!r}")
        return existing
    if value in enum_cls._value2member_map_:
        taken = enum_cls._value2member_map_[value]
        raise ValueError(f"{enum_cls.__name__} value {value!r} is already used by member {taken.name!r}")

    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member.__init__(value)
    if hasattr(next(iter(enum_cls)), "_sort_order_"):  # Python >= 3.11
        member._sort_order_ = len(enum_cls._member_names_)

    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    # EnumType.__setattr__ refuses to (re)bind member names; plain type.__setattr__ does not.
    type.__setattr__(enum_cls, name, member)
    return member
