"""The public API is what the README shows, and ``peft_lowrank_ext.__all__`` is exactly that.

The documented set is every name the README's Python code blocks import with
``from peft_lowrank_ext import ...`` (its "Public API" block lists them all). Each such line must run
as written, the method pages' import lines may only use documented names, and ``__all__`` must equal
the documented set: a name cannot become public, or stop being public, without the README changing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import peft_lowrank_ext

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").rglob("*.md"))]

_CODE_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)
_IMPORT = re.compile(r"^from peft_lowrank_ext import (\([^)]*\)|[^\n]+)", re.MULTILINE)


def documented_imports(paths=DOCUMENTS) -> list[tuple[str, str]]:
    """``(document, import statement)`` for every top-level package import in a Python code block."""
    found = []
    for path in paths:
        for block in _CODE_BLOCK.findall(path.read_text(encoding="utf-8")):
            for match in _IMPORT.finditer(block):
                found.append((str(path.relative_to(ROOT)), match.group(0)))
    return found


def imported_names(statement: str) -> list[str]:
    names = re.sub(r"#[^\n]*", "", statement.split(" import ", 1)[1]).strip().strip("()")
    return [n.split(" as ")[0].strip() for n in names.replace("\n", ",").split(",") if n.strip()]


def readme_names() -> set[str]:
    return {name for _, statement in documented_imports([README]) for name in imported_names(statement)}


@pytest.mark.parametrize("document, statement", documented_imports())
def test_every_documented_import_runs_and_names_only_documented_names(document, statement):
    exec(statement, {})  # the line exactly as the docs show it
    names = imported_names(statement)
    assert names and set(names) <= readme_names(), (document, sorted(set(names) - readme_names()))


def test_all_is_the_documented_public_api():
    exported = peft_lowrank_ext.__all__
    assert len(exported) == len(set(exported)), "duplicates in __all__"
    assert set(exported) == readme_names()


def test_every_public_name_is_importable():
    namespace: dict = {}
    exec("from peft_lowrank_ext import *", namespace)
    for name in readme_names():
        assert getattr(peft_lowrank_ext, name, None) is not None, name
        assert namespace[name] is getattr(peft_lowrank_ext, name), name
