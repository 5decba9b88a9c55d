"""The test harness itself: a failing test's processes are stopped (a server and what it started), and a missing
optional extra skips with its reason, or fails where CI requires the extras."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil

from tests.conftest import REPO

INNER = '''
import subprocess, sys
from pathlib import Path

from tests.conftest import require_extra, started

SLEEPER = ("import subprocess, sys, time; "
           "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
           "print(c.pid, flush=True); time.sleep(300)")


def test_starts_a_server_and_fails():
    proc = started(subprocess.Popen([sys.executable, "-c", SLEEPER], stdout=subprocess.PIPE, text=True))
    Path({pids!r}).write_text(f"{{proc.pid}} {{proc.stdout.readline().strip()}}")
    assert False, "fails on purpose"


def test_needs_a_missing_extra():
    require_extra("cs2fusion_no_such_module", "cloud")
'''
CONFTEST = "from tests.conftest import _stop_started_processes, pytest_sessionfinish  # noqa: F401\n"


def _inner(tmp_path: Path, **env_extra: str) -> tuple[str, list[int]]:
    folder = tmp_path / "inner"
    folder.mkdir(exist_ok=True)
    pids = tmp_path / "pids.txt"
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_inner.py").write_text(INNER.format(pids=str(pids)))
    env = {k: v for k, v in os.environ.items() if k != "CS2FUSION_REQUIRE_EXTRAS"} | env_extra
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--rootdir", str(folder), str(folder)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(REPO)})
    return proc.stdout + proc.stderr, [int(p) for p in pids.read_text().split()]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_failing_tests_processes_are_stopped_and_a_missing_extra_skips_or_fails(tmp_path: Path) -> None:
    output, pids = _inner(tmp_path)
    assert "1 failed, 1 skipped" in output and "needs the 'cloud' extra" in output, output[-3000:]
    assert len(pids) == 2 and all(_gone(pid) for pid in pids)  # the server and the process it started
    output, pids = _inner(tmp_path, CS2FUSION_REQUIRE_EXTRAS="1")
    assert "2 failed" in output and "CS2FUSION_REQUIRE_EXTRAS=1 makes it required" in output, output[-3000:]
    assert all(_gone(pid) for pid in pids)
