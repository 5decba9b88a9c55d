"""Attaching the stages to a Ray cluster: the code and environment shipped to every node, stores every node reaches.

With ``RAY_ADDRESS`` set (or inside ``ray job submit``), ``ray.init`` gets a ``runtime_env``: the ``cs2fusion`` and
``pipeline`` packages as ``py_modules`` (only the code: no data, environments or runs) and the environment variables
the workers need (MLflow tracking URI and credentials, S3 endpoint and credentials). A node only needs a Python with
the dependencies, not the checkout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cs2fusion.config import Params
from cs2fusion.io import InputError
from cs2fusion.storage import is_url
from pipeline.common import verbose

log = logging.getLogger("pipeline.cluster")
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job manager for a submitted job's driver
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_DISABLE_TELEMETRY",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "CS2FUSION_VERBOSE",
)
EXCLUDES = ["**/__pycache__", "*.pyc"]


def attached() -> bool:
    """True when the stage runs against an existing cluster (``RAY_ADDRESS``, or as a submitted job)."""
    return bool(os.environ.get("RAY_ADDRESS")) or JOB_CONFIG_ENV in os.environ


def _job_runtime_env() -> dict[str, Any]:
    try:
        return json.loads(os.environ.get(JOB_CONFIG_ENV, "{}")).get("runtime_env") or {}
    except ValueError:
        return {}


def runtime_env() -> dict[str, Any]:
    """What every worker of this driver gets: the ``cs2fusion`` and ``pipeline`` packages this driver runs (unless
    the submitted job ships modules itself) and the forwarded environment variables (less those the job sets
    itself: Ray refuses two values for one key)."""
    import cs2fusion
    import pipeline

    job = _job_runtime_env()
    env: dict[str, Any] = {}
    if "py_modules" not in job:
        env.update(py_modules=[str(Path(m.__file__).parent) for m in (cs2fusion, pipeline)], excludes=EXCLUDES)
    taken = set(job.get("env_vars") or {})
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in taken}
    if env_vars:
        env["env_vars"] = env_vars
    return env


def init() -> None:
    """``ray.init``: attached to ``RAY_ADDRESS`` with the shipped runtime env, else a local instance."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": verbose(),
                              "logging_level": logging.INFO if verbose() else logging.WARNING}
    if attached():
        kwargs["runtime_env"] = runtime_env()
        log.info("attaching to the Ray cluster at %s (code shipped as py_modules)", os.environ.get("RAY_ADDRESS"))
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, **kwargs)


def check_stores(params: Params, *, shards: str | Path, tracking_uri: str | None = None,
                 storage_path: str | None = None) -> None:
    """On a cluster, every store must be reachable from every node: one line naming the local ones, unless
    ``cluster.shared_fs`` says the paths are mounted alike everywhere."""
    if not attached() or params.cluster.shared_fs:
        return
    local = []
    if tracking_uri is not None and not tracking_uri.startswith(("http://", "https://", "databricks")):
        local.append(f"the MLflow store {tracking_uri} (set MLFLOW_TRACKING_URI to a tracking server)")
    if storage_path is not None and not is_url(storage_path):
        local.append(f"train.storage_path {storage_path} (use s3://bucket/prefix)")
    if not is_url(shards):
        local.append(f"the shards {shards} (write or push them to s3://…)")
    if local:
        raise InputError("attached to a Ray cluster, but " + "; ".join(local) + " only exist on this machine; set "
                         "cluster.shared_fs: true if every node mounts them at the same path")
