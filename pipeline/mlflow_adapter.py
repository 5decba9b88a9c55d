"""The thin MLflow layer: tracking URI, experiments, runs, batched metric logging, artifacts.

Default store: ``sqlite:///<project>/mlflow.db`` with artifacts in ``<project>/mlartifacts`` (the file store
refuses new runs in MLflow 3). ``MLFLOW_TRACKING_URI`` or ``tracking.uri`` point elsewhere (a server).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from cs2fusion import storage  # noqa: E402
from cs2fusion.config import TrackingParams, flatten, spell_union  # noqa: E402
from cs2fusion.io import InputError  # noqa: E402

log = logging.getLogger(__name__)
T = TypeVar("T")
# MLflow's HTTP client retries 7 times with backoff (about 250 s) before it raises; our own retries take over where
# waiting matters, so one request gives up quickly.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def quick_http() -> None:
    """This process's MLflow HTTP requests fail fast (no retry, 10 s timeout) unless the user set otherwise."""
    for key, value in QUICK_HTTP.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """One line (InputError) within ``timeout`` where an HTTP tracking server does not answer; other stores pass."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an auth layer may refuse /health)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise InputError(f"MLflow tracking server {uri} is not reachable ({reason}); start it or set "
                         "MLFLOW_TRACKING_URI / tracking.uri") from None


def retrying(call: Callable[[], T], what: str, patience_s: float) -> T:
    """``call()``, retried with backoff (1 s doubling to 30 s) for up to ``patience_s`` seconds, then re-raised."""
    deadline, delay = time.monotonic() + patience_s, 1.0
    while True:
        try:
            return call()
        except Exception as err:  # MLflow raises many kinds for an unreachable server
            if time.monotonic() + delay > deadline:
                raise
            log.warning("MLflow %s failed (%s); retrying in %.0f s", what, type(err).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)


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
        batch = [Metric(spell_union(k), float(v), ts, int(step)) for k, v in values.items()]
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

    def last_steps(self, keys: list[str]) -> dict[str, int]:
        """The highest step logged so far for each of ``keys`` (absent keys: -1)."""
        return {k: max((s for s, _ in self.history(k)), default=-1) for k in keys}

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def reopen(self) -> None:
        """A resumed run is RUNNING again (it may have been marked FAILED or KILLED)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def _refused(err: Exception) -> bool:
    """A 4xx answer (bad request, not found…; not 429, too many requests): the request itself was refused."""
    from mlflow.exceptions import MlflowException

    status = err.get_http_status_code() if isinstance(err, MlflowException) else 500
    return 400 <= status < 500 and status != 429


class BufferedTracker:
    """Metrics and artifacts for one run, sent by a background thread: the training loop never waits for the
    tracking server and never fails because of it. A failed send is retried (1 s doubling to 10 s: a failed
    request is cheap, and the buffer drains soon after the server is back) until it goes through; :meth:`close`
    waits up to its timeout for the rest, then writes what is left to ``spill`` (JSON lines) and says so."""

    def __init__(self, tracker: Tracker, spill: str | Path) -> None:
        self.tracker, self.spill = tracker, spill
        self.staging = Path(tempfile.mkdtemp(prefix="cs2f-artifacts-"))
        self.pending: queue.Queue = queue.Queue()
        self.deadline = float("inf")  # set by close(): past it, the sender gives up
        self.unsent: list = []
        self.thread = threading.Thread(target=self._send_all, name="mlflow-sender", daemon=True)
        self.thread.start()

    @property
    def run_id(self) -> str:
        return self.tracker.run_id

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.pending.put(("metrics", {k: float(v) for k, v in values.items()}, int(step)))

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        staged = Path(tempfile.mkdtemp(dir=self.staging)) / Path(path).name
        shutil.copy2(path, staged)  # the caller may delete its file at once
        self.pending.put(("artifact", str(staged), folder))

    def tags(self, values: dict[str, str]) -> None:
        self.pending.put(("tags", {k: str(v) for k, v in values.items()}, None))

    def _send(self, item: tuple) -> None:
        kind, a, b = item
        if kind == "metrics":
            self.tracker.metrics(a, step=b)
        elif kind == "tags":
            self.tracker.tags(a)
        else:
            self.tracker.artifact(a, b)
            shutil.rmtree(Path(a).parent, ignore_errors=True)

    def drain(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` until everything buffered so far is sent (or refused); True if it was."""
        end = time.monotonic() + timeout_s
        with self.pending.all_tasks_done:
            while self.pending.unfinished_tasks and (left := end - time.monotonic()) > 0:
                self.pending.all_tasks_done.wait(left)
            return not self.pending.unfinished_tasks

    def _send_all(self) -> None:
        while True:
            item = self.pending.get()
            if item is None:
                return
            self._deliver(item)
            self.pending.task_done()
            if self.unsent:
                return

    def _deliver(self, item: tuple) -> None:
        """Sends one item, retrying through an outage until the close deadline (then it is kept in ``unsent``)."""
        delay = 1.0
        while True:
            try:
                self._send(item)
                return
            except Exception as err:  # an outage: keep the item, wait, try again
                if _refused(err):  # the server answered no: retrying cannot help
                    log.warning("MLflow refused a %s for run %s, dropped: %s", item[0], self.run_id, err)
                    return
                wait = min(delay, self.deadline - time.monotonic())
                if wait <= 0:
                    self.unsent = [item]
                    return
                log.warning("MLflow unreachable (%s); logging buffered, retrying in %.0f s", type(err).__name__, wait)
                time.sleep(wait)
                delay = min(delay * 2, 10.0)

    def close(self, timeout_s: float) -> int:
        """Waits up to ``timeout_s`` for every buffered item to be sent; spills the rest; returns how many."""
        self.deadline = time.monotonic() + timeout_s
        self.pending.put(None)
        self.thread.join(timeout_s + 40)  # one request may still be on its way at the deadline
        left = list(self.unsent)
        while not self.pending.empty():
            item = self.pending.get_nowait()
            if item is not None:
                left.append(item)
        if left:
            lines = "".join(json.dumps({"kind": kind, "data": a, "step_or_folder": b}) + "\n" for kind, a, b in left)
            storage.write_text(self.spill, (storage.read_text(self.spill) or "") + lines)
            log.warning("MLflow stayed unreachable: %d buffered item(s) of run %s written to %s (artifacts kept in "
                        "%s)", len(left), self.run_id, self.spill, self.staging)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
        return len(left)


def new_run(uri: str, experiment: str, location: str | None, run_name: str) -> Tracker:
    """Creates a run in ``experiment`` and returns its tracker."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, experiment, location), run_name=run_name)
    return Tracker(uri, run.info.run_id)


def run_status(tracker: Tracker) -> str | None:
    """The run's status, or None where this tracking store has no such run (other errors propagate)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracker.status()
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def model_run(uri: str, run_id: str, experiment: str, location: str | None, stage: str) -> Tracker:
    """The model's training run in this store, or, where the store lacks it (a model trained elsewhere, e.g. pulled
    from a DVC remote), a new ``stage`` run tagged ``model_run`` with that id."""
    tracker = Tracker(uri, run_id)
    if run_status(tracker) is not None:
        return tracker
    log.info("MLflow run %s (the model's training) is not in %s: logging to a new %s run", run_id, uri, stage)
    tracker = new_run(uri, experiment, location, stage)
    tracker.tags({"model_run": run_id, "stage": stage})
    return tracker
