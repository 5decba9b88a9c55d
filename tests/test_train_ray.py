"""The train stage for real: Ray Train with 2 CPU workers (DDP over gloo), MLflow, checkpoints, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cs2fusion.checkpoint import read_meta
from cs2fusion.cli import app
from cs2fusion.io import read_image
from tests.conftest import DATA
from tests.tiny import prepare_and_shard, stage, write_params

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.data]


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
    final = _train(tmp_path, shards)  # a local Ray instance of its own: the quick start's path
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


def test_worker_failure_resumes_from_checkpoint(ray_head: tuple[str, Path], shards: Path, tmp_path: Path) -> None:
    write_params(tmp_path)
    marker = tmp_path / "failed_once"
    final = _train(tmp_path, shards, CS2FUSION_FAIL_AT_STEP="5", CS2FUSION_FAIL_MARKER=str(marker),
                   RAY_ADDRESS=ray_head[0])
    assert marker.exists()  # the failure really happened
    client = _client(tmp_path)
    resumed = client.get_metric_history(final["mlflow_run_id"], "resume/from_epoch")
    assert [m.value for m in resumed] == [1.0]  # epoch 1's checkpoint (step 3); step 5 was in epoch 2
    assert [m.value for m in client.get_metric_history(final["mlflow_run_id"], "resume/from_step")] == [3.0]
    assert final["epoch"] == 3 and final["step"] == 9  # finished, nothing lost
    assert read_meta(tmp_path / "models" / "model.safetensors")["epoch"] == 3


def test_training_and_fusing_on_the_started_head(ray_head: tuple[str, Path], shards: Path, tmp_path: Path) -> None:
    address, temp_dir = ray_head
    write_params(tmp_path, train={"epochs": 1})
    final = _train(tmp_path, shards, RAY_ADDRESS=address)
    assert final["epoch"] == 1
    logs = list((temp_dir / "session_latest" / "logs").glob("worker-*.out"))
    assert any("RayTrainWorker" in p.read_text(errors="ignore") for p in logs)  # the head ran the workers

    # the fuse stage on the attached cluster (a Ray task per shard) writes what the local run writes
    write_params(tmp_path, train={"epochs": 1}, fuse={"published": ""})
    fuse = ("fuse", "--model", "models/model.safetensors", "--shards", str(shards))
    stage(tmp_path, *fuse, "--out", "fused_local")
    on_ray = stage(tmp_path, *fuse, "--out", "fused_ray", RAY_ADDRESS=address)
    assert "on the Ray cluster" in on_ray.stderr
    local = sorted(p.relative_to(tmp_path / "fused_local") for p in (tmp_path / "fused_local").rglob("*.png"))
    remote = sorted(p.relative_to(tmp_path / "fused_ray") for p in (tmp_path / "fused_ray").rglob("*.png"))
    assert local == remote and len(local) == 10
    for rel in local:
        assert (tmp_path / "fused_local" / rel).read_bytes() == (tmp_path / "fused_ray" / rel).read_bytes(), rel


def test_other_model_width_trains_validates_and_fuses(ray_head: tuple[str, Path], shards: Path,
                                                      tmp_path: Path) -> None:
    """``model.channels: 8`` (the Winograd kernel is built for 16): the train stage's validation grid and
    ``cs2fusion fuse`` take the direct head."""
    write_params(tmp_path, model={"channels": 8}, train={"epochs": 1, "max_steps_per_epoch": 2})
    final = _train(tmp_path, shards, RAY_ADDRESS=ray_head[0])
    run = _client(tmp_path).list_artifacts(final["mlflow_run_id"], "val_samples")
    assert [a.path for a in run] == ["val_samples/val_epoch_001.png"]
    model = tmp_path / "models" / "model.safetensors"
    assert read_meta(model)["model"]["channels"] == 8
    pairs = tmp_path / "pairs"
    for kind in ("ir", "vi"):
        (pairs / kind).mkdir(parents=True)
        shutil.copy(DATA / "tno40" / kind / "3.png", pairs / kind / "3.png")
    result = CliRunner().invoke(app, ["fuse", "--model", str(model), "--ir", str(pairs / "ir"),
                                      "--vi", str(pairs / "vi"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_image(tmp_path / "out" / "3.png").shape == read_image(pairs / "vi" / "3.png").shape


def test_stopped_run_resumes_on_request(ray_head: tuple[str, Path], shards: Path, tmp_path: Path) -> None:
    write_params(tmp_path, train={"max_failures": 0})
    marker = tmp_path / "failed_once"
    with pytest.raises(AssertionError, match="pipeline.train failed"):
        _train(tmp_path, shards, CS2FUSION_FAIL_AT_STEP="5", CS2FUSION_FAIL_MARKER=str(marker),
               RAY_ADDRESS=ray_head[0])
    run_id = (tmp_path / "runs" / "train" / "mlflow_run_id").read_text().strip()
    assert _client(tmp_path).get_run(run_id).info.status == "FAILED"
    stage(tmp_path, "train", "--shards", str(shards), "--out", "models/model.safetensors", "--metrics",
          "metrics/train.json", "--resume", RAY_ADDRESS=ray_head[0])
    final = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert final["mlflow_run_id"] == run_id and final["epoch"] == 3 and final["step"] == 9
    client = _client(tmp_path)
    assert [m.value for m in client.get_metric_history(run_id, "resume/from_epoch")] == [1.0]
    assert client.get_run(run_id).info.status == "FINISHED"
