"""Shared fixtures and the test tiers.

Tiers (markers): **unit** (everything unmarked: synthetic tensors, ``cs2fusion synth`` images and the shipped model;
no ``../shared``, no compiler needed), **data** (reads ``../shared``: skipped with the reason where it is absent,
required with ``CS2FUSION_REQUIRE_DATA=1``, which ``.ci/run`` sets), **slow** (Ray, an MLflow server, ``dvc repro``).
Tests of the compiled kernel skip where it cannot be built, unless ``CS2FUSION_REQUIRE_KERNELS=1``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CS2FUSION_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
PUBLISHED = SHARED / "reference" / "cs2fusion-published"
GOLDEN = SHARED / "reference" / "metrics-golden"
RS40 = DATA / "cs2fusion_roadscene40"
HAVE_DATA = (DATA / "MANIFEST.md").is_file()
NO_DATA = f"real data not found at {SHARED} (set CS2FUSION_SHARED)"


def _required(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not HAVE_DATA and _required("CS2FUSION_REQUIRE_DATA"):
        raise pytest.UsageError(f"{NO_DATA}; CS2FUSION_REQUIRE_DATA=1 makes it required")


@pytest.hookimpl(tryfirst=True)  # before -m selects by the markers added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("data", "slow")):
            item.add_marker(pytest.mark.unit)
        elif not HAVE_DATA and item.get_closest_marker("data"):
            item.add_marker(pytest.mark.skip(reason=NO_DATA))


def require_data() -> None:
    """Skips the calling test or fixture where ../shared is absent (a test that forgot its ``data`` mark)."""
    if not HAVE_DATA:
        pytest.skip(NO_DATA)


@pytest.fixture(scope="session")
def winograd_kernel() -> ModuleType:
    """The compiled Winograd head, or a skip where this machine cannot build it."""
    from cs2fusion.inference import kernels

    kernel = kernels.winograd_head()
    if kernel is None:
        if _required("CS2FUSION_REQUIRE_KERNELS"):
            pytest.fail("the Winograd kernel could not be built and CS2FUSION_REQUIRE_KERNELS=1")
        pytest.skip("the Winograd kernel cannot be built here (no C++ compiler or ninja)")
    return kernel


@pytest.fixture(scope="session")
def published_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release's weights imported through ``cs2fusion import-published``."""
    from typer.testing import CliRunner

    from cs2fusion.cli import app

    require_data()
    out = tmp_path_factory.mktemp("published") / "published.safetensors"
    result = CliRunner().invoke(app, ["import-published", str(PUBLISHED), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def published_fused_rs40(published_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cs2fusion fuse`` with the imported published weights over the paper's 40 RoadScene test pairs."""
    from typer.testing import CliRunner

    from cs2fusion.cli import app

    out = tmp_path_factory.mktemp("published_fused")
    result = CliRunner().invoke(app, ["fuse", "--model", str(published_ckpt), "--ir", str(RS40 / "ir"),
                                      "--vi", str(RS40 / "vi"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def shipped_backbone():
    """The package's default model (in the repository: the unit tier's trained weights)."""
    from cs2fusion.checkpoint import load_checkpoint
    from cs2fusion.pretrained import DEFAULT_MODEL

    return load_checkpoint(DEFAULT_MODEL).backbone


def synth_pairs(count: int, height: int, width: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cs2fusion synth`` pairs as (visible Y float32, IR float32) on 0–255."""
    from cs2fusion.color import rgb_to_grey
    from cs2fusion.data.synth import synth_pair

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        ir, vis = synth_pair(rng, height, width)
        pairs.append((rgb_to_grey(vis), ir.astype(np.float32)))
    return pairs


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` over ``folder`` (sqlite store, local artifacts), up and
    answering ``/health`` when this returns."""
    import urllib.request

    from tests.tiny import env

    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         str(folder / "artifacts"), "--workers", "1"],
        env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(1)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[tuple[str, Path]]:
    """One Ray head per session on 127.0.0.1 (``ray start --head``, 2 CPUs) for the tests that can share it:
    (address, its temp dir)."""
    from tests.tiny import env

    port = free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            probe = subprocess.run([str(ray_bin), "status", f"--address=127.0.0.1:{port}"], env=env(),
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None and time.time() < deadline, head.stdout.read() if head.stdout else ""
            time.sleep(2)
        yield f"127.0.0.1:{port}", temp_dir
    finally:  # the head's whole process group (gcs, raylet, workers): a graceful stop took ~30 s here
        head.terminate()
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
