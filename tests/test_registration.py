"""Importing the package registers every method with PEFT, idempotently, on every supported Python."""

from __future__ import annotations

import glob
import importlib
import os
import subprocess
import sys
import textwrap

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import peft_lowrank_ext
from peft_lowrank_ext.tuners._base.registry import check_prefix_is_unique, register_method

OWN = {
    "RLORA": ("rlr_", peft_lowrank_ext.RLoraConfig, peft_lowrank_ext.RLoraModel),
    "AUTOLORA": ("autolr_", peft_lowrank_ext.AutoLoraConfig, peft_lowrank_ext.AutoLoraModel),
    "PRILORA": ("prilr_", peft_lowrank_ext.PriLoraConfig, peft_lowrank_ext.PriLoraModel),
    "HETEROLORA": ("hetlr_", peft_lowrank_ext.HeteroLoraConfig, peft_lowrank_ext.HeteroLoraModel),
}


def test_methods_are_real_peft_types_with_unique_prefixes():
    for name, (prefix, config_cls, model_cls) in OWN.items():
        member = PeftType[name]
        assert isinstance(member, PeftType) and member.value == name and PeftType(name) is member
        assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is config_cls
        assert PEFT_TYPE_TO_TUNER_MAPPING[member] is model_cls
        assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == prefix == model_cls.prefix
        others = [p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if t != member]
        assert not any(prefix in o or o in prefix for o in others)


def test_reimport_is_idempotent():
    before = PeftType.RLORA
    importlib.reload(peft_lowrank_ext)
    assert PeftType.RLORA is before
    assert register_method("rlora", peft_lowrank_ext.RLoraConfig, peft_lowrank_ext.RLoraModel) is before
    assert list(PeftType).count(before) == 1
    assert all(list(PeftType).count(PeftType[name]) == 1 for name in OWN)


def test_prefix_checks():
    with pytest.raises(ValueError, match="contains 'lora_'"):
        check_prefix_is_unique(PeftType.RLORA, "xlora_")
    with pytest.raises(ValueError, match="overlaps"):
        check_prefix_is_unique(PeftType.RLORA, "vera_lambda_")


def test_config_round_trips_through_peft_type_string():
    config = peft_lowrank_ext.RLoraConfig(projection_ratio=0.1)
    assert config.peft_type is PeftType.RLORA
    again = type(config).from_peft_type(**config.to_dict())
    assert again.peft_type is PeftType.RLORA and again.projection_fingerprint == config.projection_fingerprint


def _interpreters():
    found = {sys.executable}
    for minor in (10, 11, 12, 13):
        found.update(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    return sorted(found)


def test_enum_extension_on_every_available_python():
    """The enum trick relies on CPython internals: exercise it on each interpreter present (stdlib only)."""
    path = os.path.join(os.path.dirname(peft_lowrank_ext.__file__), "tuners", "_base", "peft_type.py")
    script = textwrap.dedent(
        """
        import enum, importlib.util, pickle, sys
        spec = importlib.util.spec_from_file_location("ext", sys.argv[1])
        ext = importlib.util.module_from_spec(spec); spec.loader.exec_module(ext)
        class T(str, enum.Enum):
            A = "A"
        m = ext.extend_str_enum(T, "NEW", "NEW")
        assert ext.extend_str_enum(T, "NEW", "NEW") is m
        assert T.NEW is m and T("NEW") is m and T["NEW"] is m and m == "NEW" and isinstance(m, T)
        assert list(T) == [T.A, m] and pickle.loads(pickle.dumps(m)) is m and {m: 1}["NEW"] == 1
        try:
            ext.extend_str_enum(T, "NEW", "OTHER")
        except ValueError:
            pass
        else:
            raise SystemExit("conflicting value accepted")
        print("%d.%d" % sys.version_info[:2])
        """
    )
    versions = set()
    for python in _interpreters():
        proc = subprocess.run([python, "-c", script, path], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, (python, proc.stderr)
        versions.add(proc.stdout.strip())
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in versions
    print("enum extension checked on Python", sorted(versions))
