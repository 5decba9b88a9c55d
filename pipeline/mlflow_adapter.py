"""The thin MLflow layer: tracking URI, experiments, runs, batched metric logging, artifacts.

Default store: ``sqlite:///<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts`` (the file store
refuses new runs in MLflow 3). ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point elsewhere (a server).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cs2fusion.config import TrackingParams, flatten  # noqa: E402


def tracking_uri(params: TrackingParams, root: Path) -> str:
    """Env ``MLFLOW_TRACKING_URI`` > ``tracking.uri`` > the embedded local store under ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"


@contextlib.contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``mlflow.start_run``, ``log_model``) on ``uri`` for the block only.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to this process's environment, which every
    later child process would inherit; the previous URI and environment come back afterwards.
    """
    saved_env, saved_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def artifact_location(params: TrackingParams, root: Path) -> str | None:
    """Where a new experiment keeps artifacts: a local folder for the embedded store, the server's default else."""
    if os.environ.get("MLFLOW_TRACKING_URI") or params.uri:
        return None
    return (root / params.artifact_root).resolve().as_uri()


def experiment_id(client: MlflowClient, name: str, location: str | None) -> str:
    """Id of experiment ``name``, created (with ``location``) if missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=location)


def git_commit(root: Path) -> str:
    """HEAD commit of the project (``unknown`` outside git), ``-dirty`` when the tree has changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    """Logs to one existing MLflow run by id (safe from any process: no global active-run state)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = MlflowClient(uri)

    def metrics(self, values: dict[str, float], step: int) -> None:
        ts = mlflow.utils.time.get_current_time_millis()
        batch = [Metric(k, float(v), ts, int(step)) for k, v in values.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def params(self, values: dict[str, Any]) -> None:
        flat = [Param(k, str(v)[:6000]) for k, v in flatten(values).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])

    def tags(self, values: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in values.items()])

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def new_run(uri: str, experiment: str, location: str | None, run_name: str) -> Tracker:
    """Creates a run in ``experiment`` and returns its tracker."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, experiment, location), run_name=run_name)
    return Tracker(uri, run.info.run_id)
