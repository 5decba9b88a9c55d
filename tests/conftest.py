"""Shared fixtures and the test tiers.

Tiers (markers): **unit** (everything unmarked: synthetic tensors, ``cs2fusion synth`` images and the shipped model;
no ``../shared``, no compiler needed), **data** (reads ``../shared``: skipped with the reason where it is absent,
required with ``CS2FUSION_REQUIRE_DATA=1``, which ``.ci/run`` sets), **slow** (Ray, an MLflow server, ``dvc repro``),
**cluster** (object storage on a local S3 server, a second Ray node).
Tests of the compiled kernel skip where it cannot be built, unless ``CS2FUSION_REQUIRE_KERNELS=1``; tests of an
optional extra (``cloud``: object storage) skip with the reason where it is missing, unless
``CS2FUSION_REQUIRE_EXTRAS=1`` (``.ci/run``). Every process a test or fixture starts through :func:`started` is
stopped when that test ends, passed or failed, with the processes it started in turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
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


def require_extra(module: str, extra: str) -> None:
    """Skips the calling test (or fixture) where ``module`` of the optional ``extra`` is not installed, with the
    reason; a failure instead under ``CS2FUSION_REQUIRE_EXTRAS=1`` (CI, where a missing extra is a broken setup)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        reason = f"needs the {extra!r} extra ({module} is not installed: pip install -e '.[{extra}]')"
        if _required("CS2FUSION_REQUIRE_EXTRAS"):
            pytest.fail(f"{reason}; CS2FUSION_REQUIRE_EXTRAS=1 makes it required")
        pytest.skip(reason)


_STARTED: list[subprocess.Popen] = []


def started(proc: subprocess.Popen) -> subprocess.Popen:
    """Registers a process this test started: it is stopped (with its children) when the test ends, however."""
    _STARTED.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """Terminates a process and every process it started (SIGKILL after ``grace_s``)."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


@pytest.fixture(autouse=True)
def _stop_started_processes() -> Iterator[None]:
    """After each test (and its function-scoped fixtures' teardown): the processes it started are stopped."""
    first = len(_STARTED)
    yield
    while len(_STARTED) > first:
        stop(_STARTED.pop())


def pytest_sessionstart(session: pytest.Session) -> None:
    if not HAVE_DATA and _required("CS2FUSION_REQUIRE_DATA"):
        raise pytest.UsageError(f"{NO_DATA}; CS2FUSION_REQUIRE_DATA=1 makes it required")


# Under pytest-xdist (scripts/test.sh: `-n 2 --dist loadgroup`) each process starts its own session fixtures: the
# tests that use one of these costly ones run in one process, so each starts once. The Ray trainings also run one
# after another in that process (test_train_ray.py's module mark), the dvc repro end to end and
# the CPU-bound tests fill the other. (pytest < 9.2: scripts/constraints.txt says why.)
SHARED_FIXTURE_GROUPS = {"ray_head": "ray", "s3_server": "ray", "published_fused_rs40": "published"}


@pytest.hookimpl(tryfirst=True)  # before -m selects by the markers added here, and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        group = next((g for name, g in SHARED_FIXTURE_GROUPS.items() if name in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
        if not any(item.get_closest_marker(name) for name in ("data", "slow", "cluster")):
            item.add_marker(pytest.mark.unit)
        elif not HAVE_DATA and item.get_closest_marker("data"):
            item.add_marker(pytest.mark.skip(reason=NO_DATA))


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _STARTED:  # a module or session fixture's process whose setup failed midway
        stop(_STARTED.pop())
    from tests.tiny import LOCAL_RAY_TMP

    shutil.rmtree(LOCAL_RAY_TMP, ignore_errors=True)  # the local Ray instances' sessions (logs, spilled objects)


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


def start_mlflow_server(folder: Path, port: int, artifacts: str = "", **env_extra: str) -> subprocess.Popen:
    """A real ``mlflow server`` on 127.0.0.1:``port`` over ``folder`` (sqlite store; artifacts in ``folder`` or at
    ``artifacts``, e.g. ``s3://…`` with the S3 environment in ``env_extra``), answering ``/health`` when this
    returns."""
    import urllib.request

    from tests.tiny import env

    proc = started(subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         artifacts or str(folder / "artifacts"), "--workers", "1"],
        env=env(**env_extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 90
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                return proc
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(1)
    except BaseException:
        stop(proc)
        raise


@dataclasses.dataclass(frozen=True)
class RayHead:
    address: str  # GCS, for RAY_ADDRESS and `ray start --address`
    temp_dir: Path
    dashboard: str  # http://…, for `ray job submit`


TRAINER_SLOT = "trainer_slot"  # custom resource: one per node in the tests' cluster (one training worker each)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """One Ray head per session on 127.0.0.1 (``ray start --head``, 2 CPUs, one ``trainer_slot``, the dashboard for
    the Jobs API) for the tests that can share it."""
    from tests.tiny import env

    port, dashboard = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", f"--resources={{\"{TRAINER_SLOT}\": 1}}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
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
        yield RayHead(f"127.0.0.1:{port}", temp_dir, f"http://127.0.0.1:{dashboard}")
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


S3_BUCKET = "cs2fusion"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A local S3-compatible server (moto's standalone server) on 127.0.0.1 with the bucket ``cs2fusion``: yields the
    environment that reaches it (endpoint, credentials: what a cluster's nodes would be given)."""
    for module in ("s3fs", "boto3"):
        require_extra(module, "cloud")
    import boto3

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "cs2fusion-test",
           "AWS_SECRET_ACCESS_KEY": "cs2fusion-test", "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="cs2fusion-test",
                              aws_secret_access_key="cs2fusion-test", region_name="us-east-1")
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:
                assert proc.poll() is None and time.time() < deadline, "the S3 server did not start"
                time.sleep(0.5)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture()
def s3(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """This process reaches the local S3 server; returns a fresh ``s3://`` prefix for the test."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
