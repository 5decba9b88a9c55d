"""The MLflow model registry: log the pyfunc model, register a version, aliases, the promotion gate, and
resolving ``models:/<name>@<alias>`` back to a local checkpoint for ``cs2fusion fuse``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.mlflow_adapter import Tracker, fluent_uri

log = logging.getLogger(__name__)
CHECKPOINT_ARTIFACT = "checkpoint"
REPO = Path(__file__).resolve().parents[1]


def pip_requirements() -> list[str]:
    """The served model's requirements: the package's own runtime dependencies (and MLflow) at the installed
    versions (local build tags such as ``+cpu`` dropped). Given explicitly, so that MLflow does not infer them by
    loading the model in a subprocess (about 2 minutes on 2 cores)."""
    import re
    from importlib import metadata

    names = ["mlflow"] + [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0] for req in metadata.requires("cs2fusion") or []
                          if "extra ==" not in req]
    return [f"{n}=={metadata.version(n).split('+')[0]}" for n in dict.fromkeys(names)]


def log_pyfunc(tracker: Tracker, checkpoint: Path, name: str) -> str:
    """Logs the pyfunc model into the run and registers it; returns the new version."""
    import mlflow

    from pipeline import pyfunc_model

    example = {"ir": np.zeros((1, 16, 16), np.uint8), "vi": np.zeros((1, 16, 16, 3), np.uint8)}
    chatter = io.StringIO()  # MLflow prints its registry progress to stderr; our log line says the outcome
    with fluent_uri(tracker.uri), mlflow.start_run(run_id=tracker.run_id), contextlib.redirect_stderr(chatter):
        info = mlflow.pyfunc.log_model(
            name="pyfunc",
            python_model=pyfunc_model.__file__,  # model from code: nothing is pickled
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            code_paths=[str(REPO / "cs2fusion"), str(REPO / "pipeline")],
            signature=pyfunc_model.SIGNATURE,
            input_example=example,
            pip_requirements=pip_requirements(),
            registered_model_name=name,
        )
    log.debug("%s", chatter.getvalue().strip())
    return str(info.registered_model_version)


def gate(candidate: dict[str, float], champion: dict[str, float] | None, metrics: list[str],
         min_wins: int) -> tuple[bool, list[str]]:
    """Promote when there is no champion, or the candidate wins at least ``min_wins`` of ``metrics``."""
    if champion is None:
        return True, list(metrics)
    won = [m for m in metrics if candidate[m] > champion[m]]
    return len(won) >= min_wins, won


def register(tracker: Tracker, checkpoint: Path, *, name: str, evaluation: dict[str, float],
             gate_metrics: list[str], min_wins: int, card: str, tags: dict[str, str]) -> dict[str, Any]:
    """Registers a version, aliases it ``challenger``, promotes it to ``champion`` through the gate."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    version = log_pyfunc(tracker, checkpoint, name)
    try:
        current = client.get_model_version_by_alias(name, "champion")
        champion_eval = json.loads(current.tags["evaluation"])
        champion_version = current.version
    except (MlflowException, KeyError):
        champion_eval, champion_version = None, None
    promote, won = gate(evaluation, champion_eval, gate_metrics, min_wins)
    client.set_registered_model_alias(name, "challenger", version)
    if promote:
        client.set_registered_model_alias(name, "champion", version)
    decision = {
        "version": version,
        "promoted": promote,
        "previous_champion": champion_version,
        "wins": won,
        "rule": f"wins >= {min_wins} of {gate_metrics}",
    }
    for key, value in {**tags, "evaluation": json.dumps(evaluation, sort_keys=True),
                       "decision": json.dumps(decision, sort_keys=True)}.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=card)
    return decision


def resolve_checkpoint(uri: str) -> Path:
    """A registry or run URI of a cs2fusion pyfunc model → the local path of its checkpoint."""
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp(prefix="cs2f")))
    found = sorted(folder.rglob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{uri}: no cs2fusion checkpoint among the model's artifacts")
    return found[0]
