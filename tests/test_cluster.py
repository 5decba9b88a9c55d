"""The cluster path with real parts on this machine: a local S3 server (moto) as the object store for shards,
checkpoints, MLflow artifacts and a DVC remote; a second Ray node without the checkout; a node lost mid-run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cs2fusion import storage
from cs2fusion.checkpoint import load_checkpoint, read_meta
from cs2fusion.cli import app
from cs2fusion.config import Params, build
from cs2fusion.data.manifest import build_manifest
from cs2fusion.data.shards import TrainShards, iter_eval, read_index, set_shards, write_shards
from cs2fusion.io import InputError, read_image
from tests.conftest import (DATA, REPO, TRAINER_SLOT, RayHead, free_port, require_extra, start_mlflow_server,
                            started)
from tests.tiny import TINY, demo_params, env, stage, write_params

log = logging.getLogger(__name__)
pytestmark = [pytest.mark.cluster, pytest.mark.data]  # in the "ray" xdist group by their fixtures (ray_head, s3)


def test_shards_in_object_storage(s3: str, tmp_path: Path) -> None:
    """The shard stage's writer into ``s3://`` gives the same bytes as a local folder; the readers take the URL; a
    damaged or missing object, or a prefix the stage did not write, is one line naming it."""
    params = build(Params, TINY)
    manifest = build_manifest(params.prepare)
    write_shards(manifest, params.shard, tmp_path / "local")
    url = storage.join(s3, "shards")
    write_shards(manifest, params.shard, url)
    write_shards(manifest, params.shard, url)  # an earlier output of the stage is replaced
    index = read_index(url)
    assert index == read_index(tmp_path / "local")
    for name, entry in index["sets"].items():
        for record in entry["shards"]:
            local = (tmp_path / "local" / record["file"]).read_bytes()
            assert storage.read_bytes(storage.join(url, record["file"])) == local
    ids = [meta["id"] for meta, _, _ in iter_eval([u for u, _ in set_shards(url, "tno/test")])]
    assert ids == [meta["id"] for meta, _, _ in iter_eval([u for u, _ in set_shards(tmp_path / "local", "tno/test")])]
    remote = TrainShards(set_shards(url, "train"), seed=1)
    local = TrainShards(set_shards(tmp_path / "local", "train"), seed=1)
    assert [k for k, *_ in remote] == [k for k, *_ in local]

    first = storage.join(url, index["sets"]["train"]["shards"][0]["file"])
    storage.write_text(first, "truncated")
    with pytest.raises(InputError, match=f"{first}: shard corrupt"):
        set_shards(url, "train")
    storage.write_text(storage.join(s3, "foreign", "notes.txt"), "someone else's")
    with pytest.raises(InputError, match="not an earlier output of the shard stage"):
        write_shards(manifest, params.shard, storage.join(s3, "foreign"))
    with pytest.raises(InputError, match="no shard index"):
        read_index(storage.join(s3, "nothing"))


class SecondNode:
    """``ray start --address`` of a second node on this machine, as a separate host would run it: its own working
    folder without the checkout, a Python with the dependencies but not cs2fusion, no S3 or MLflow settings."""

    def __init__(self, head: RayHead, home: Path) -> None:
        self.head, self.home, self.proc = head, home, None
        venv = home / "venv"  # a venv that sees the project's dependencies but not its editable install
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
        (next(venv.glob("lib/python*/site-packages")) / "deps.pth").write_text(f"{site}\n")
        self.python = venv / "bin" / "python"
        probe = subprocess.run([str(self.python), "-c", "import ray, torch; import cs2fusion"], cwd=home,
                               capture_output=True, text=True, env=self._env())
        assert "No module named 'cs2fusion'" in probe.stderr, probe.stderr  # the checkout is out of its reach

    def _env(self) -> dict[str, str]:
        keep = ("PATH", "HOME", "LANG", "TMPDIR")
        return {k: v for k, v in os.environ.items() if k in keep} | {"RAY_AUTH_MODE": "disabled"}

    def start(self) -> None:
        self.proc = started(subprocess.Popen(
            [str(self.python), "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", "start",
             f"--address={self.head.address}", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             f'--resources={{"{TRAINER_SLOT}": 1}}', "--disable-usage-stats"],
            cwd=self.home, env=self._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        deadline = time.time() + 90
        while _alive_slots(self.head) < 2:
            assert self.proc.poll() is None and time.time() < deadline, "the second node did not join"
            time.sleep(1)

    def raylet(self) -> psutil.Process:
        return next(p for p in psutil.Process(self.proc.pid).children(recursive=True) if p.name() == "raylet")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops its node and tells the head
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _alive_slots(head: RayHead) -> int:
    """``trainer_slot`` resources of the live nodes, as the head's GCS reports them."""
    proc = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address={head.address}"],
                          capture_output=True, text=True, env=env())
    line = next((row for row in proc.stdout.splitlines() if TRAINER_SLOT in row), "")
    return int(float(line.split("/")[1].split()[0])) if "/" in line else 0


@pytest.fixture()
def second_node(ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondNode]:
    node = SecondNode(ray_head, tmp_path_factory.mktemp("node2"))
    node.start()
    try:
        yield node
    finally:
        node.stop()
        deadline = time.time() + 60
        while _alive_slots(ray_head) > 1 and time.time() < deadline:  # the next test sees a one-node cluster
            time.sleep(1)


class Job:
    """A job on the cluster through the head's Jobs API (``ray job submit``), the working folder = the checkout."""

    def __init__(self, head: RayHead, env_vars: dict[str, str]) -> None:
        self.head, self.env_vars, self.id = head, env_vars, f"cs2fusion-test-{uuid.uuid4().hex[:8]}"

    def _ray(self, command: str, *args: str) -> subprocess.CompletedProcess:
        ray = str(Path(sys.executable).parent / "ray")
        return subprocess.run([ray, "job", command, f"--address={self.head.dashboard}", *args], capture_output=True,
                              text=True, env=env(), timeout=300)

    def submit(self, *entrypoint: str) -> None:
        runtime_env = json.dumps({"env_vars": self.env_vars})
        proc = self._ray("submit", "--no-wait", f"--submission-id={self.id}", f"--working-dir={REPO}",
                         f"--runtime-env-json={runtime_env}", "--", *entrypoint)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def status(self) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.head.dashboard).get_job_status(self.id).value)

    def wait(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while (status := self.status()) in ("PENDING", "RUNNING") and time.time() < deadline:
            time.sleep(2)
        return status

    def logs(self) -> str:
        return self._ray("logs", self.id).stdout[-6000:]

    def stop(self) -> None:
        if self.status() in ("PENDING", "RUNNING"):
            self._ray("stop", self.id)


def _snapshot_epoch(run: str) -> int:
    """The epoch of the latest checkpoint Ray has registered in the run's storage (0 if none yet)."""
    try:
        snapshot = json.loads(storage.read_text(storage.join(run, "checkpoint_manager_snapshot.json")) or "{}")
        return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
    except (KeyError, TypeError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.ray
def test_two_nodes_object_storage_and_a_lost_node(ray_head: RayHead, second_node: SecondNode, s3: str,
                                                  s3_server: dict[str, str], tmp_path: Path) -> None:
    """The train stage submitted with ``ray job submit --working-dir``: 2-worker DDP across two nodes (one worker
    forced onto the second by ``trainer_slot``), shards, checkpoints and the model in S3, MLflow on a server with S3
    artifacts. The second node's raylet is killed mid-run and started again: the run resumes from its last
    checkpoint in S3 and finishes in one MLflow run, every step logged once."""
    s3_env = dict(s3_server)
    port = free_port()
    server = start_mlflow_server(tmp_path, port, artifacts=storage.join(s3, "mlartifacts"), **s3_env)
    uri = f"http://127.0.0.1:{port}"
    write_params(tmp_path, train={"epochs": 3, "max_steps_per_epoch": 0, "val_set": "", "tracking": {"log_every": 1},
                                  "storage_path": storage.join(s3, "runs"),
                                  "scaling": {"num_workers": 2, "loader_workers": 0,
                                              "worker_resources": {TRAINER_SLOT: 1}, "max_failures": 2}},
                 cluster={"shared_fs": False})
    shards = storage.join(s3, "shards")
    stage(tmp_path, "prepare", "--out", "data/manifest.json")
    stage(tmp_path, "shard", "--manifest", "data/manifest.json", "--out", shards, **s3_env)
    run, model_url = storage.join(s3, "runs", "train"), storage.join(s3, "models", "model.safetensors")
    job = Job(ray_head, env_vars={"MLFLOW_TRACKING_URI": uri, **s3_env})  # the README's `ray job submit`
    job.submit("python", "-m", "pipeline.train", "--params", str(tmp_path / "params.yaml"), "--shards", shards,
               "--out", model_url, "--metrics", str(tmp_path / "metrics" / "train.json"))
    try:
        deadline = time.time() + 300
        while _snapshot_epoch(run) < 1:
            assert job.status() in ("PENDING", "RUNNING") and time.time() < deadline, job.logs()
            time.sleep(0.3)
        second_node.raylet().kill()  # the node is lost mid-run: its training worker dies with it
        second_node.proc.wait(timeout=60)
        second_node.start()  # capacity comes back
        assert job.wait(600) == "SUCCEEDED", job.logs()
    finally:
        job.stop()
        server.terminate()
        server.wait(timeout=30)
    server = start_mlflow_server(tmp_path, port, artifacts=storage.join(s3, "mlartifacts"), **s3_env)
    try:
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("cs2fusion").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run_id = runs[0].info.run_id
        final = json.loads((tmp_path / "metrics" / "train.json").read_text())
        steps = final["step"]
        assert final["epoch"] == 3 and final["mlflow_run_id"] == run_id
        assert [m.value for m in client.get_metric_history(run_id, "resume/from_epoch")][0] >= 1
        assert sorted(m.step for m in client.get_metric_history(run_id, "loss/backbone")) == list(range(1, steps + 1))
        assert sorted(m.step for m in client.get_metric_history(run_id, "epoch/loss/backbone")) == [1, 2, 3]
        tags = client.get_run(run_id).data.tags
        assert tags["worker/0/node_id"] != tags["worker/1/node_id"]  # one rank per node
        for rank in (0, 1):  # both imported the code Ray shipped, not the checkout
            assert not Path(tags[f"worker/{rank}/code"]).is_relative_to(REPO), tags[f"worker/{rank}/code"]
        assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.safetensors"}
    finally:
        server.terminate()
    assert any(k.endswith("model/model.safetensors") for k in storage.filesystem(s3)[0].find(storage.filesystem(
        storage.join(s3, "mlartifacts"))[1]))  # the artifact went to the S3 store
    assert _snapshot_epoch(run) == 3
    model = tmp_path / "model.safetensors"
    model.write_bytes(storage.read_bytes(model_url))
    assert read_meta(model)["epoch"] == 3
    pairs = tmp_path / "pairs"
    for kind in ("ir", "vi"):
        (pairs / kind).mkdir(parents=True)
        shutil.copy(DATA / "tno40" / kind / "3.png", pairs / kind / "3.png")
    result = CliRunner().invoke(app, ["fuse", "--model", str(model), "--ir", str(pairs / "ir"), "--vi",
                                      str(pairs / "vi"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "out" / "3.png").shape == read_image(pairs / "vi" / "3.png").shape


SHARD_STAGES = """stages:
  prepare:
    cmd: python -m pipeline.prepare --out data/manifest.json
    params: [prepare]
    outs: [data/manifest.json]
  shard:
    cmd: python -m pipeline.shard --manifest data/manifest.json --out data/shards
    deps: [data/manifest.json]
    params: [shard]
    outs: [data/shards]
"""


def test_dvc_remote_on_object_storage(s3: str, s3_server: dict[str, str], tmp_path: Path) -> None:
    """``dvc push`` of the stages' outputs to an S3 remote (``endpointurl``), then ``dvc pull`` into a fresh clone:
    ``data/shards`` comes back byte for byte."""
    require_extra("dvc_s3", "cloud")
    project, clone = tmp_path / "project", tmp_path / "clone"
    write_params(project)
    (project / "dvc.yaml").write_text(SHARD_STAGES)
    run_env = env(**s3_server)

    def run(folder: Path, *args: str) -> str:
        proc = subprocess.run(args, cwd=folder, env=run_env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{args}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    run(project, "git", "init", "-q")
    run(project, "dvc", "init", "-q")
    run(project, "dvc", "remote", "add", "-d", "store", storage.join(s3, "dvc"))
    run(project, "dvc", "remote", "modify", "store", "endpointurl", s3_server["AWS_ENDPOINT_URL"])
    run(project, "dvc", "repro", "-q")
    run(project, "dvc", "push", "-q")
    run(project, *git, "add", "-A")
    run(project, *git, "commit", "-qm", "shards")
    run(tmp_path, "git", "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "shards").exists() and not (clone / "data" / "manifest.json").exists()
    run(clone, "dvc", "pull", "-q")
    original = {p.relative_to(project): p.read_bytes() for p in (project / "data" / "shards").rglob("*")}
    pulled = {p.relative_to(clone): p.read_bytes() for p in (clone / "data" / "shards").rglob("*")}
    assert pulled == original and any(p.suffix == ".tar" for p in original)
    assert json.loads(run(clone, "dvc", "status", "--json")) == {}


def _weights(model: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(model, with_cpn=True)
    return {**{f"backbone.{k}": v for k, v in ckpt.backbone.state_dict().items()},
            **{f"cpn.{k}": v for k, v in ckpt.cpn.state_dict().items()}}


# the CPN's last bias shifts the map before its normalisation (min-max or mean ± k std), which removes constants: it
# changes no output, its gradient is zero in exact arithmetic, so Adam moves it by ±lr on rounding noise
NO_EFFECT = "cpn.estimator.bias"


def _weights_apart(a: Path, b: Path) -> float:
    """The largest ‖Δ‖ / ‖w‖ over the parameter tensors of two checkpoints (but :data:`NO_EFFECT`)."""
    wa, wb = _weights(a), _weights(b)
    return max(float((wb[k] - w).norm() / w.norm().clamp_min(1e-12)) for k, w in wa.items() if k != NO_EFFECT)


@pytest.mark.slow
@pytest.mark.ray
def test_any_cluster_shape_trains_the_same_model(ray_head: RayHead, second_node: SecondNode,
                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """The train stage on the demo shards with 1 and with 2 workers, same seed: per-step ``loss/backbone`` within
    1e-4 relative and the final weights within 1e-4; then elastic (``num_workers: [1, 2]``, one worker per node):
    the second node is lost mid-epoch 2, the run continues on 1 worker from epoch 1's checkpoint and ends with the
    same weights within 1e-4."""
    data = tmp_path_factory.mktemp("demo")
    demo_params(data)
    stage(data, "synth")
    stage(data, "prepare", "--out", "data/manifest.json")
    stage(data, "shard", "--manifest", "data/manifest.json", "--out", "data/shards")
    shards = str(data / "data" / "shards")
    args = ("--shards", shards, "--out", "model.safetensors", "--metrics", "train.json")
    curves, models = {}, {}
    for workers in (1, 2):
        folder = tmp_path_factory.mktemp(f"workers{workers}")
        demo_params(folder, num_workers=workers)
        stage(folder, "train", *args, RAY_ADDRESS=ray_head.address)
        run_id = json.loads((folder / "train.json").read_text())["mlflow_run_id"]
        history = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").get_metric_history(run_id, "loss/backbone")
        curves[workers] = [m.value for m in sorted(history, key=lambda m: m.step)]
        models[workers] = folder / "model.safetensors"
    assert len(curves[1]) == len(curves[2]) == 10  # 2 epochs of 5 steps (of 9: 72 patches / 8)
    apart = max(abs(b - a) / abs(a) for a, b in zip(curves[1], curves[2])), _weights_apart(models[1], models[2])
    log.info("1 vs 2 workers: loss/backbone %.2e, weights %.2e (relative)", *apart)
    assert apart[0] <= 1e-4 and apart[1] <= 1e-4, (apart, curves)

    folder = tmp_path_factory.mktemp("elastic")
    demo_params(folder, num_workers=[1, 2], worker_resources={TRAINER_SLOT: 1})
    train = started(subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=folder,
                                     env=env(RAY_ADDRESS=ray_head.address), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 300
        while _snapshot_epoch(str(folder / "runs" / "demo")) < 1:
            assert train.poll() is None and time.time() < deadline, train.communicate()[0][-4000:]
            time.sleep(0.2)
        second_node.raylet().kill()  # the node and its worker are lost in epoch 2
        output, _ = train.communicate(timeout=600)
        assert train.returncode == 0, output[-4000:]
    finally:
        train.kill()
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run_id = json.loads((folder / "train.json").read_text())["mlflow_run_id"]
    workers = {m.step: m.value for m in client.get_metric_history(run_id, "epoch/perf/workers")}
    assert workers == {1: 2, 2: 1}, workers  # epoch 1 on two workers, epoch 2 (again) on one
    assert [m.value for m in client.get_metric_history(run_id, "resume/from_epoch")] == [1]
    elastic = _weights_apart(models[2], folder / "model.safetensors")
    log.info("elastic (2 workers, then 1 from epoch 1's checkpoint) vs 2 workers: weights %.2e", elastic)
    assert elastic <= 1e-4

