"""The train stage for real: Ray Train with 2 CPU workers (DDP over gloo), MLflow, checkpoints, failures."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cs2fusion.checkpoint import read_meta
from tests.tiny import env, prepare_and_shard, stage, write_params

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write_params(folder)
    return prepare_and_shard(folder)


def _train(folder: Path, shards: Path, **env_extra: str) -> dict:
    stage(folder, "train", "--shards", str(shards), "--out", "models/model.safetensors", "--metrics",
          "metrics/train.json", **env_extra)
    return json.loads((folder / "metrics" / "train.json").read_text())


def _client(folder: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")


def test_two_workers_train_and_log(shards: Path, tmp_path: Path) -> None:
    write_params(tmp_path)
    final = _train(tmp_path, shards)
    client = _client(tmp_path)
    run = client.get_run(final["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2" and run.data.params["train.lr_backbone"] == "0.002"
    assert len(run.data.tags["git_commit"]) >= 7 and len(run.data.tags["shards_sha256"]) == 64
    per_epoch = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch/loss/backbone"),
                                         key=lambda m: m.step)]
    assert len(per_epoch) == 3 and per_epoch[-1] < per_epoch[0]
    assert len(client.get_metric_history(run.info.run_id, "loss/cpn")) == 9  # every step
    assert client.get_metric_history(run.info.run_id, "epoch/perf/samples_per_s")[0].value > 0
    artifacts = {a.path for folder in ("", "plots", "val_samples", "model")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/loss_curves.png", "model/model.safetensors", "val_samples/val_epoch_003.png"} <= artifacts
    meta = read_meta(tmp_path / "models" / "model.safetensors")
    assert meta["epoch"] == 3 and meta["step"] == 9 and meta["mlflow_run_id"] == run.info.run_id


def test_worker_failure_resumes_from_checkpoint(shards: Path, tmp_path: Path) -> None:
    write_params(tmp_path)
    marker = tmp_path / "failed_once"
    final = _train(tmp_path, shards, CS2FUSION_FAIL_AT_STEP="5", CS2FUSION_FAIL_MARKER=str(marker))
    assert marker.exists()  # the failure really happened
    client = _client(tmp_path)
    resumed = client.get_metric_history(final["mlflow_run_id"], "resume/from_epoch")
    assert [m.value for m in resumed] == [1.0]  # epoch 1's checkpoint (step 3); step 5 was in epoch 2
    assert [m.value for m in client.get_metric_history(final["mlflow_run_id"], "resume/from_step")] == [3.0]
    assert final["epoch"] == 3 and final["step"] == 9  # finished, nothing lost
    assert read_meta(tmp_path / "models" / "model.safetensors")["epoch"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_training_and_fusing_on_a_separately_started_head(shards: Path, tmp_path: Path) -> None:
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            probe = subprocess.run([str(ray_bin), "status", f"--address=127.0.0.1:{port}"], env=env(),
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert head.poll() is None, head.stdout.read() if head.stdout else ""
            time.sleep(2)
        write_params(tmp_path, train={"epochs": 1})
        final = _train(tmp_path, shards, RAY_ADDRESS=f"127.0.0.1:{port}")
        assert final["epoch"] == 1
        logs = list((Path(temp_dir) / "session_latest" / "logs").glob("worker-*.out"))
        assert any("RayTrainWorker" in p.read_text(errors="ignore") for p in logs)  # the head ran the workers

        # the fuse stage on the attached cluster (a Ray task per shard) writes what the local run writes
        write_params(tmp_path, train={"epochs": 1}, fuse={"published": ""})
        fuse = ("fuse", "--model", "models/model.safetensors", "--shards", str(shards))
        stage(tmp_path, *fuse, "--out", "fused_local")
        on_ray = stage(tmp_path, *fuse, "--out", "fused_ray", RAY_ADDRESS=f"127.0.0.1:{port}")
        assert "on the Ray cluster" in on_ray.stderr
        local = sorted(p.relative_to(tmp_path / "fused_local") for p in (tmp_path / "fused_local").rglob("*.png"))
        remote = sorted(p.relative_to(tmp_path / "fused_ray") for p in (tmp_path / "fused_ray").rglob("*.png"))
        assert local == remote and len(local) == 10
        for rel in local:
            assert (tmp_path / "fused_local" / rel).read_bytes() == (tmp_path / "fused_ray" / rel).read_bytes(), rel
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_stopped_run_resumes_on_request(shards: Path, tmp_path: Path) -> None:
    write_params(tmp_path, train={"max_failures": 0})
    marker = tmp_path / "failed_once"
    with pytest.raises(AssertionError, match="pipeline.train failed"):
        _train(tmp_path, shards, CS2FUSION_FAIL_AT_STEP="5", CS2FUSION_FAIL_MARKER=str(marker))
    run_id = (tmp_path / "runs" / "train" / "mlflow_run_id").read_text().strip()
    assert _client(tmp_path).get_run(run_id).info.status == "FAILED"
    stage(tmp_path, "train", "--shards", str(shards), "--out", "models/model.safetensors", "--metrics",
          "metrics/train.json", "--resume")
    final = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert final["mlflow_run_id"] == run_id and final["epoch"] == 3 and final["step"] == 9
    client = _client(tmp_path)
    assert [m.value for m in client.get_metric_history(run_id, "resume/from_epoch")] == [1.0]
    assert client.get_run(run_id).info.status == "FINISHED"
