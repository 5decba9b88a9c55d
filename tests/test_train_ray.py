"""The train stage for real: Ray Train with 2 CPU workers (DDP over gloo), MLflow, checkpoints, failures."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cs2fusion.checkpoint import read_meta
from cs2fusion.cli import app
from cs2fusion.config import load_params
from cs2fusion.io import InputError
from pipeline.train import fit, latest_checkpoint, read_history
from cs2fusion.io import read_image
from tests.conftest import DATA, RayHead, free_port, start_mlflow_server, started
from tests.tiny import env, prepare_and_shard, stage, write_params

# one process of `-n 2` runs all of them, after one another (tests/conftest.py: SHARED_FIXTURE_GROUPS)
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.data, pytest.mark.xdist_group("ray")]


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
    assert run.data.params["train.scaling.num_workers"] == "2" and run.data.params["train.lr_backbone"] == "0.002"
    assert len(run.data.tags["git_commit"]) >= 7 and len(run.data.tags["shards_sha256"]) == 64
    per_epoch = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch/loss/backbone"),
                                         key=lambda m: m.step)]
    assert len(per_epoch) == 3 and per_epoch[-1] < per_epoch[0]
    assert len(client.get_metric_history(run.info.run_id, "loss/cpn")) == 9  # every step
    # learning rates per step and per epoch on axes of their own (one key held both: step 5 had 2e-05 and 2e-06)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr/backbone")) == list(range(1, 10))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/lr/backbone")) == [1, 2, 3]
    assert client.get_metric_history(run.info.run_id, "epoch/perf/samples_per_s")[0].value > 0
    artifacts = {a.path for folder in ("", "plots", "val_samples", "model")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/loss_curves.png", "model/model.safetensors", "val_samples/val_epoch_003.png"} <= artifacts
    meta = read_meta(tmp_path / "models" / "model.safetensors")
    assert meta["step"] == 3 * meta["epoch"] and meta["mlflow_run_id"] == run.info.run_id
    # validation every epoch; the model is the best-scoring checkpoint, and says so
    keys = ("EN", "Qabf", "SSIM", "corr_ir", "score", "map_mean", "map_high", "map_std")
    val = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, f"val/{key}"),
                                         key=lambda m: m.step)] for key in keys}
    assert all(len(v) == 3 for v in val.values()) and 0 < val["EN"][0] < 8 and -1 <= val["corr_ir"][0] <= 1
    assert 0 <= val["map_high"][0] <= 1 and 0 < val["map_mean"][0] < 1 and 0 <= val["map_std"][0] <= 0.5
    best = max(range(3), key=lambda k: (val["score"][k], k))
    assert meta["epoch"] == best + 1 and meta["val_score"] == pytest.approx(val["score"][best])
    assert meta["selection"].startswith(f"best val/score (composite) {val['score'][best]:.4f} at epoch {best + 1}")
    assert run.data.tags["selected_epoch"] == str(best + 1) and run.data.tags["precision"] == "fp32"
    assert final["selected_epoch"] == best + 1


def test_training_and_fusing_on_the_started_head(ray_head: RayHead, shards: Path, tmp_path: Path) -> None:
    address, temp_dir = ray_head.address, ray_head.temp_dir
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


def test_other_model_width_trains_validates_and_fuses(ray_head: RayHead, shards: Path,
                                                      tmp_path: Path) -> None:
    """``model.channels: 8`` (the Winograd kernel is built for 16): the train stage's validation grid and
    ``cs2fusion fuse`` take the direct head."""
    write_params(tmp_path, model={"channels": 8}, train={"epochs": 1, "max_steps_per_epoch": 2})
    final = _train(tmp_path, shards, RAY_ADDRESS=ray_head.address)
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


def _wait_for_checkpoint(run_dir: Path, epoch: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until Ray has registered a checkpoint of ``epoch`` or later (its snapshot file, not just the folder)."""
    deadline, snapshot = time.time() + timeout, run_dir / "checkpoint_manager_snapshot.json"
    while True:
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            latest = 0
        if latest >= epoch:
            return
        assert proc.poll() is None, f"the stage ended before a checkpoint of epoch {epoch} ({proc.returncode})"
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.2)


def _single_run(folder: Path) -> tuple[MlflowClient, Any]:
    client = _client(folder)
    runs = client.search_runs([client.get_experiment_by_name("cs2fusion").experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    return client, runs[0]


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


TRAIN_STAGE = """stages:
  train:
    cmd: python -m pipeline.train --shards data/shards --out models/model.safetensors --metrics metrics/train.json
    deps: [data/shards]
    params: [train]
    outs: [models/model.safetensors]
    metrics:
      - metrics/train.json:
          cache: false
"""


def test_killed_stage_continues_under_dvc_repro(ray_head: RayHead, shards: Path, tmp_path: Path) -> None:
    """kill -9 of the train stage mid-run, then ``dvc repro``: it continues from the last checkpoint in the same
    MLflow run (FINISHED, each step logged once), and the result reaches dvc.lock."""
    write_params(tmp_path, train={"epochs": 5, "val_set": ""})
    shutil.copytree(shards, tmp_path / "data" / "shards")
    (tmp_path / "dvc.yaml").write_text(TRAIN_STAGE)
    dvc = str(Path(sys.executable).parent / "dvc")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dvc, *args], cwd=tmp_path, env=env(RAY_ADDRESS=ray_head.address), capture_output=True,
                              text=True, timeout=600)

    assert run("init", "--no-scm", "-q").returncode == 0
    repro = started(subprocess.Popen([dvc, "repro"], cwd=tmp_path, env=env(RAY_ADDRESS=ray_head.address),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    _wait_for_checkpoint(tmp_path / "runs" / "train", 2, repro)
    stage = next(p for p in psutil.Process(repro.pid).children(recursive=True)  # python itself, not `$SHELL -c`
                 if "pipeline.train" in p.cmdline())
    stage.kill()
    assert repro.wait(timeout=120) != 0
    killed_run = (tmp_path / "runs" / "train" / "mlflow_run_id").read_text().strip()

    proc = run("repro")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert final["epoch"] == 5 and final["step"] == 15 and final["mlflow_run_id"] == killed_run
    client, mlflow_run = _single_run(tmp_path)
    assert mlflow_run.info.status == "FINISHED"
    resumed = client.get_metric_history(killed_run, "resume/from_epoch")
    assert len(resumed) == 1 and resumed[0].value >= 2
    assert _steps(client, killed_run, "loss/backbone") == list(range(1, 16))  # each step once, none missing
    assert _steps(client, killed_run, "epoch/loss/backbone") == list(range(1, 6))
    history = read_history(latest_checkpoint(tmp_path / "runs" / "train"))  # carried across the kill, each epoch once
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    logged = {m.step: m.value for m in client.get_metric_history(killed_run, "epoch/loss/backbone")}
    assert [row["epoch/loss/backbone"] for row in history] == pytest.approx([logged[e] for e in range(1, 6)])
    status = run("status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout  # dvc.lock has the result


def test_tracking_outage_does_not_stop_training(ray_head: RayHead, shards: Path, tmp_path: Path) -> None:
    """The tracking server stops for 15 s mid-run: training goes on, buffered metrics arrive once it is back."""
    write_params(tmp_path, train={"epochs": 4, "val_set": ""})
    port = free_port()
    server = start_mlflow_server(tmp_path, port)
    uri = f"http://127.0.0.1:{port}"
    train = started(subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--shards", str(shards), "--out", "models/model.safetensors",
         "--metrics", "metrics/train.json"], cwd=tmp_path,
        env=env(RAY_ADDRESS=ray_head.address, MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
    try:
        _wait_for_checkpoint(tmp_path / "runs" / "train", 1, train)
        server.terminate()
        server.wait(timeout=30)
        time.sleep(15)  # longer than the sender's longest wait (10 s): several failed tries
        server = start_mlflow_server(tmp_path, port)
        output, _ = train.communicate(timeout=900)
        assert train.returncode == 0, output[-4000:]
        client = MlflowClient(uri)
        run_id = json.loads((tmp_path / "metrics" / "train.json").read_text())["mlflow_run_id"]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert _steps(client, run_id, "loss/backbone") == list(range(1, 13))
        assert _steps(client, run_id, "epoch/loss/backbone") == list(range(1, 5))
        assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.safetensors"}
        assert not (tmp_path / "runs" / "train" / "unlogged_metrics.jsonl").exists()
    finally:
        train.kill()
        server.terminate()


def test_preflight_fails_fast_and_keeps_the_previous_run(shards: Path, tmp_path: Path) -> None:
    """An unreachable tracking server or a missing start checkpoint: one line within seconds, before Ray starts,
    and the previous run's folder is left as it was."""
    write_params(tmp_path)
    previous = tmp_path / "runs" / "train"
    previous.mkdir(parents=True)
    (previous / "checkpoint_old").mkdir()
    args = ["--shards", str(shards), "--out", "models/model.safetensors"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, env=env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}"), timeout=300)
    assert proc.returncode == 2 and "not reachable" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert time.monotonic() - start < 60 and (previous / "checkpoint_old").is_dir()
    # the same checks in-process (no second start-up): a missing start checkpoint, nothing to resume
    params = load_params(write_params(tmp_path, train={"init_from": str(tmp_path / "nope.safetensors")}))
    with pytest.raises(InputError, match="nope.safetensors"):
        fit(params, shards=shards, out=tmp_path / "m.safetensors", metrics_out=None, root=tmp_path)
    params = load_params(write_params(tmp_path, train={"resume": "must", "storage_path": str(tmp_path / "runs")}))
    with pytest.raises(InputError, match="nothing to resume"):
        fit(params, shards=shards, out=tmp_path / "m.safetensors", metrics_out=None, root=tmp_path)
    assert (previous / "checkpoint_old").is_dir() and not (tmp_path / "m.safetensors").exists()
