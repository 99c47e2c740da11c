"""Background jobs for the kernel tests.

The Triton-interpreter modules (``interp_*.py``) must run in their own process with
``TRITON_INTERPRET=1`` set before Triton is imported, and the sm_90 compilation is CPU-bound. Both
start as subprocesses right after collection, so on a 2-core machine they overlap with the
in-process tests; the tests marked ``background(name)`` then wait for their job and check it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from _kernel_checks import SM90_JSON

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHILD_ENV = "PEFT_LOWRANK_KERNEL_TEST_CHILD"


@dataclass
class Job:
    process: subprocess.Popen
    log_path: Path
    workdir: Path

    def wait(self, timeout: float) -> tuple[int, str]:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        return code, self.log_path.read_text()


# Children load only the kernels subpackage: the package's __init__ imports transformers and peft,
# seconds of CPU per process that these jobs never use (the in-process tests import it normally).
_BOOTSTRAP = (
    "import sys, types; pkg = types.ModuleType('peft_lowrank_ext'); "
    f"pkg.__path__ = [{str(ROOT / 'peft_lowrank_ext')!r}]; sys.modules['peft_lowrank_ext'] = pkg; "
)


def _command(name: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env[CHILD_ENV] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if name == "sm90":  # one worker: the interpreter jobs keep the other core busy
        env["TRITON_INTERPRET"] = "0"
        args = ["--workers", "1", "--json", str(workdir / SM90_JSON)]
        code = (f"sys.path.insert(0, {str(ROOT / 'bench')!r}); import sm90_report; "
                f"sys.exit(sm90_report.main({args!r}))")
    else:
        env["TRITON_INTERPRET"] = "1"
        args = ["-q", "-p", "no:cacheprovider", str(HERE / f"{name}.py")]
        code = f"import pytest; sys.exit(pytest.main({args!r}))"
    return [sys.executable, "-c", _BOOTSTRAP + code], env


def _start(name: str, root: Path) -> Job:
    workdir = root / name
    workdir.mkdir()
    cmd, env = _command(name, workdir)
    log_path = workdir / "log.txt"
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return Job(process, log_path, workdir)


def pytest_configure(config):
    config.addinivalue_line("markers", "background(name): the test checks the result of a background job")


def pytest_collection_finish(session):
    if os.environ.get(CHILD_ENV):
        return
    names = {m.args[0] for item in session.items for m in item.iter_markers("background")}
    if names:
        session.config._kernel_jobs_root = root = Path(tempfile.mkdtemp(prefix="kernel-tests-"))
        session.config._kernel_jobs = {name: _start(name, root) for name in sorted(names)}


def pytest_sessionfinish(session):
    for job in getattr(session.config, "_kernel_jobs", {}).values():
        if job.process.poll() is None:
            job.process.kill()
            job.process.wait()
    if hasattr(session.config, "_kernel_jobs_root"):
        shutil.rmtree(session.config._kernel_jobs_root, ignore_errors=True)


@pytest.fixture
def background_job(request) -> Job:
    """The job named by the test's ``background`` marker."""
    name = request.node.get_closest_marker("background").args[0]
    jobs = getattr(request.config, "_kernel_jobs", {})
    if name not in jobs:
        pytest.skip(f"background job {name!r} was not started (run from the test session)")
    return jobs[name]
