"""The machinery of tests/peft_suite itself: fetching PEFT's tests, failing (never skipping) without them, and an
exclusion list that names only tests and cases that exist."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import tarfile
from pathlib import Path

import peft
import pytest

import peft_upstream
import suite_cases
from suite_exclusions import EXCLUSIONS


def test_failed_download_raises_naming_the_command_and_pips_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_LOWRANK_EXT_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found for peft==9.9")
    monkeypatch.setattr(peft_upstream.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(peft_upstream.UpstreamUnavailable) as info:
        peft_upstream.fetch_tests_dir("9.9")
    message = str(info.value)
    assert "pip download --no-deps --no-binary :all: peft==9.9" in message
    assert "No matching distribution found" in message and "exit 1" in message
    assert list(tmp_path.iterdir()) == []  # the temporary download folder is removed
    advice = peft_upstream.failure_message(info.value)
    assert peft.__version__ in advice and str(tmp_path) in advice and "No matching distribution" in advice


def _sdist(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return path


def test_only_the_tests_folder_is_extracted_without_links_or_escapes(tmp_path):
    top = "peft-1.0/"
    sdist = _sdist(tmp_path / "peft-1.0.tar.gz", {
        top + "tests/testing_common.py": b"X = 1\n", top + "tests/sub/data.txt": b"d", top + "src/peft/x.py": b"",
        top + "tests/../../escaped.py": b""},
        links={top + "tests/link.py": "/etc/passwd"})
    peft_upstream._extract_tests(sdist, "1.0", tmp_path / "out")
    files = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["tests/sub/data.txt", "tests/testing_common.py"]
    assert not (tmp_path / "out" / "tests" / "link.py").exists() and not (tmp_path / "escaped.py").exists()


def test_an_sdist_without_the_test_suite_is_refused(tmp_path):
    sdist = _sdist(tmp_path / "peft-1.0.tar.gz", {"peft-1.0/src/peft/x.py": b""})
    with pytest.raises(peft_upstream.UpstreamUnavailable, match="has no peft-1.0/tests/testing_common.py"):
        peft_upstream._extract_tests(sdist, "1.0", tmp_path / "out")


def _unavailable():
    raise peft_upstream.UpstreamUnavailable("`pip download ...` failed (exit 1): no network")


@pytest.mark.parametrize("module", ["test_peft_custom_models", "test_peft_decoder_models", "test_peft_seq_cls_models"])
@pytest.mark.parametrize("load, expected", [
    (_unavailable, "own test suite is not available.*no network"),
    (lambda: {}, "fetched but could not be re-parametrised.*KeyError.*update tests/peft_suite/suite_cases.py"),
], ids=["download-failed", "layout-changed"])
def test_a_module_without_usable_peft_tests_has_one_failing_test(module, load, expected, monkeypatch):
    monkeypatch.setattr(peft_upstream, "load", load)
    path = Path(__file__).with_name(f"{module}.py")
    spec = importlib.util.spec_from_file_location(f"_offline_{module}", path)
    offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(offline)
    tests = [name for name in vars(offline) if name.startswith("test") or name.startswith("Test")]
    assert tests == ["test_peft_common_suite_is_available"]
    with pytest.raises(pytest.fail.Exception, match=expected):
        offline.test_peft_common_suite_is_available()


def _parametrised_cases() -> set[tuple[str, str, str]]:
    """(test name, method, case id) of every test the suite modules build from PEFT's classes."""
    import test_peft_custom_models
    import test_peft_decoder_models
    import test_peft_seq_cls_models

    classes = [test_peft_custom_models.TestCustomModels, test_peft_custom_models.TestMultipleActiveAdapters,
               test_peft_decoder_models.TestDecoderModels, test_peft_seq_cls_models.TestSeqClsModels]
    found = set()
    for cls in classes:
        for name, func in vars(cls).items():
            for mark in getattr(func, "pytestmark", []):
                if mark.name != "parametrize" or "config_cls" not in str(mark.args[0]):
                    continue
                for param in mark.args[1]:
                    config = next(v for v in param.values if isinstance(v, suite_cases.ConfigFactory)
                                  or (isinstance(v, type) and v in suite_cases.METHOD_OF_CLASS))
                    method = config.method if isinstance(config, suite_cases.ConfigFactory) else \
                        suite_cases.METHOD_OF_CLASS[config]
                    found.add((name, method, param.id))
    return found


def test_every_exclusion_names_existing_tests_methods_and_cases():
    peft_upstream.load()  # without PEFT's tests, fail with the reason rather than with a missing class
    cases = _parametrised_cases()
    assert {m for _, m, _ in cases} == set(suite_cases.CONFIG_CLASSES)
    for entry in EXCLUSIONS:
        assert entry.reason and set(entry.methods) <= set(suite_cases.CONFIG_CLASSES)
        for test in entry.tests:
            hits = [c for c in cases if c[0] == test and c[1] in entry.methods
                    and (not entry.cases or any(s in c[2] for s in entry.cases))]
            assert hits, f"exclusion of {test} ({entry.methods}, {entry.cases}) matches no test of the suite"
