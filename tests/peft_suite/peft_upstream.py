"""Fetch the test suite of the *installed* PEFT version from its sdist, and import it under a unique name.

PEFT's sdist ships ``tests/`` (``testing_common.py`` with ``PeftCommonTester``, ``test_custom_models.py``,
``test_decoder_models.py``, ...). It is downloaded with pip from the package index once, extracted into a
cache outside the repository and imported from there; nothing of PEFT's code is kept in this repository.

* cache: ``$PEFT_LOWRANK_EXT_CACHE`` or ``$XDG_CACHE_HOME/peft-lowrank-ext`` (default ``~/.cache/peft-lowrank-ext``),
  one folder ``peft-<version>-tests`` per version, written atomically (safe with concurrent test runs);
* import: the extracted ``tests`` folder becomes the package :data:`PACKAGE`, so PEFT's relative imports
  (``from .testing_common import ...``) resolve inside it and nothing named ``tests`` or ``testing_utils`` is
  put on ``sys.path`` (where it would clash with this repository's own test modules).

A failed download never skips anything: :func:`load` raises :class:`UpstreamUnavailable` with what failed and
how to fix it, and the suite turns that into a failing test (see ``conftest.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft

PACKAGE = "peft_upstream_tests"  # import name of PEFT's extracted tests folder
MODULES = ("testing_utils", "testing_common", "test_custom_models", "test_decoder_models", "test_seq_classifier")
DOWNLOAD_TIMEOUT_S = 600


class UpstreamUnavailable(RuntimeError):
    """PEFT's test suite could not be fetched or imported."""


def cache_root() -> Path:
    explicit = os.environ.get("PEFT_LOWRANK_EXT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "peft-lowrank-ext"


def _download_sdist(version: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={version}",
               "-d", str(into), "--disable-pip-version-check", "--quiet"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UpstreamUnavailable(f"`{' '.join(command)}` did not run: {error}") from error
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise UpstreamUnavailable(f"`{' '.join(command)}` failed (exit {done.returncode}): {tail}")
    found = sorted(into.glob("peft-*.tar.gz"))
    if not found:
        raise UpstreamUnavailable(f"`{' '.join(command)}` succeeded but left no peft-*.tar.gz in {into}")
    return found[0]


def _extract_tests(sdist: Path, version: str, into: Path) -> None:
    """Extract only ``peft-<version>/tests/*`` of the sdist into ``into/tests`` (no links, no paths outside)."""
    top = f"peft-{version}/tests/"
    with tarfile.open(sdist, "r:gz") as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(top) and (m.isfile() or m.isdir())
                   and ".." not in Path(m.name).parts]
        if not any(m.name == top + "testing_common.py" for m in members):
            raise UpstreamUnavailable(f"{sdist} has no {top}testing_common.py; this PEFT release does not ship "
                                      "its test suite, which tests/peft_suite needs")
        for member in members:
            member.name = "tests/" + member.name[len(top):]
        archive.extractall(into, members=members, filter="data")


def fetch_tests_dir(version: str | None = None) -> Path:
    """The extracted ``tests`` folder of PEFT ``version`` (default: the installed one), fetched if not cached."""
    version = version or peft.__version__
    root = cache_root()
    target = root / f"peft-{version}-tests"
    if (target / "tests" / "testing_common.py").is_file():
        return target / "tests"
    try:
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".peft-{version}-", dir=root))
    except OSError as error:
        raise UpstreamUnavailable(f"cannot write the cache folder {root}: {error}; set PEFT_LOWRANK_EXT_CACHE to a "
                                  "writable folder") from error
    try:
        sdist = _download_sdist(version, work / "sdist")
        _extract_tests(sdist, version, work / "tree")
        try:
            os.replace(work / "tree", target)  # atomic: a concurrent run either sees nothing or the whole folder
        except OSError as error:
            if not (target / "tests" / "testing_common.py").is_file():
                raise UpstreamUnavailable(f"cannot move the extracted tests to {target} ({error}); remove that "
                                          "folder if it is left over from an interrupted run") from error
    except (OSError, tarfile.TarError) as error:
        raise UpstreamUnavailable(f"extracting PEFT {version}'s sdist failed: {type(error).__name__}: {error}") \
            from error
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target / "tests"


@contextlib.contextmanager
def _diffusers_placeholder():
    """Let ``testing_common`` import without diffusers installed.

    ``testing_common.py`` imports ``diffusers.StableDiffusionPipeline`` at module level only for two
    ``isinstance`` checks in ``_test_disable_adapter`` (Stable Diffusion pipelines, which this suite never
    builds). Without diffusers, a module whose ``StableDiffusionPipeline`` is a class nothing is an instance
    of stands in while PEFT's modules are imported, and is removed from ``sys.modules`` right after.
    """
    if importlib.util.find_spec("diffusers") is not None:
        yield
        return
    placeholder = types.ModuleType("diffusers")
    placeholder.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {
        "__doc__": "Placeholder: diffusers is not installed; no object is an instance of this class."})
    sys.modules["diffusers"] = placeholder
    try:
        yield
    finally:
        if sys.modules.get("diffusers") is placeholder:
            del sys.modules["diffusers"]


def import_tests(tests_dir: Path) -> dict[str, types.ModuleType]:
    """Import PEFT's test modules from ``tests_dir`` as ``peft_upstream_tests.<name>``."""
    package = sys.modules.get(PACKAGE)
    if package is None or list(getattr(package, "__path__", [])) != [str(tests_dir)]:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(tests_dir)]
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
    modules = {}
    with _diffusers_placeholder():
        for name in MODULES:
            try:
                modules[name] = importlib.import_module(f"{PACKAGE}.{name}")
            except Exception as error:
                raise UpstreamUnavailable(
                    f"importing PEFT {peft.__version__}'s tests/{name}.py from {tests_dir} failed: "
                    f"{type(error).__name__}: {error}") from error
    return modules


_LOADED: dict[str, types.ModuleType] | None = None
_ERROR: UpstreamUnavailable | None = None


def load() -> dict[str, types.ModuleType]:
    """Fetch (once per cache) and import PEFT's test modules; raise :class:`UpstreamUnavailable` on failure."""
    global _LOADED, _ERROR
    if _LOADED is None and _ERROR is None:
        try:
            _LOADED = import_tests(fetch_tests_dir())
        except UpstreamUnavailable as error:
            _ERROR = error
    if _ERROR is not None:
        raise _ERROR
    return _LOADED


def failure_message(error: BaseException) -> str:
    if not isinstance(error, UpstreamUnavailable):  # fetched, but PEFT's test layout is not what suite_cases expects
        return (f"PEFT {peft.__version__}'s test suite was fetched but could not be re-parametrised over this "
                f"package's methods: {type(error).__name__}: {error}. PEFT's test layout changed; update "
                "tests/peft_suite/suite_cases.py.")
    return (f"PEFT {peft.__version__}'s own test suite is not available, so its common tests cannot run against "
            f"this package's methods: {error}. The suite downloads the sdist of the installed PEFT from the package "
            f"index once (pip download --no-deps --no-binary :all: peft=={peft.__version__}) into {cache_root()}; "
            "give the machine index access once, or extract that sdist's tests/ folder to "
            f"{cache_root() / f'peft-{peft.__version__}-tests' / 'tests'}.")
