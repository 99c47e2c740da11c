"""PEFT's own common test suite, run against this package's four methods.

On import this fetches and imports the test suite of the installed PEFT version (``peft_upstream.py``:
``pip download`` of PEFT's sdist into a cache outside the repository, extracted once). The test modules next to
this file re-parametrise PEFT's common tests over the four methods (``suite_cases.py``).

* A download or import failure makes the suite *fail* with the reason (one failing test per module), never skip.
* Tests that do not apply are listed, with their reason, in ``suite_exclusions.py`` only; they are reported as
  skipped with that reason. A test that PEFT's own code skips for one of our methods, and that the list does not
  name, fails: every skip has to be accounted for in the one list.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import peft_upstream
from suite_exclusions import exclusion_for

try:  # fetch + import once, at collection; the test modules read the cached result (or the error)
    peft_upstream.load()
except peft_upstream.UpstreamUnavailable:
    pass

_EXCLUDED_ATTR = "_peft_suite_exclusion"
_HERE = Path(__file__).resolve().parent


def _in_suite(item) -> bool:
    return _HERE in Path(item.path).resolve().parents


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not _in_suite(item):
            continue
        reason = exclusion_for(item)
        if reason is not None:
            setattr(item, _EXCLUDED_ATTR, reason)
            item.add_marker(pytest.mark.skip(reason=f"excluded in tests/peft_suite/suite_exclusions.py: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or getattr(item, _EXCLUDED_ATTR, None) or not _in_suite(item):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"PEFT's test skipped itself for this case ({reason}), and tests/peft_suite/"
                       "suite_exclusions.py does not list it: make the test run, or list it there with the reason.")
