"""Every Triton kernel under the interpreter, each module in its own TRITON_INTERPRET=1 process."""

from __future__ import annotations

import pytest
from _kernel_checks import INTERPRETER_MODULES

TIMEOUT_S = 540


@pytest.mark.parametrize(
    "module", [pytest.param(m, marks=pytest.mark.background(m)) for m in INTERPRETER_MODULES]
)
def test_interpreter_module(module, background_job):
    code, log = background_job.wait(TIMEOUT_S)
    print(log)
    assert code == 0, f"{module}.py failed under TRITON_INTERPRET=1:\n{log}"
