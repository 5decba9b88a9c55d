"""The MLflow model registry: log the pyfunc model, register a version, aliases, the promotion gate, and
resolving ``models:/<name>@<alias>`` back to a local checkpoint for ``cs2fusion fuse``."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cs2fusion.io import InputError
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


def champion_record(client: Any, name: str) -> tuple[str | None, dict[str, str] | None]:
    """(version, tags) of ``name``'s champion; (None, None) where the model or the alias does not exist yet.
    Any other registry error raises: the gate never reads "unknown" as "no champion"."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None, None
        raise
    version = (model.aliases or {}).get("champion")
    if version is None:
        return None, None
    return str(version), dict(client.get_model_version(name, version).tags)


def judge(evaluation: dict[str, float], judged_on: dict[str, str], champion: tuple[str | None, dict | None],
          gate_metrics: list[str], min_wins: int) -> dict[str, Any]:
    """The gate's decision against the champion's recorded evaluation; fails closed: a champion whose evaluation
    is unreadable, or was made on another set or metrics version, is never beaten by default."""
    version, tags = champion
    decision: dict[str, Any] = {"previous_champion": version, "rule": f"wins >= {min_wins} of {gate_metrics}",
                                "judged_on": judged_on}
    if version is None:
        return {**decision, "promoted": True, "wins": list(gate_metrics), "reason": "no champion yet"}
    try:
        champion_eval = json.loads(tags["evaluation"])
        champion_on = json.loads(tags["judged_on"])
        missing = [m for m in gate_metrics if not isinstance(champion_eval.get(m), (int, float))]
    except (AttributeError, KeyError, TypeError, ValueError):
        champion_eval, champion_on, missing = None, None, []
    if champion_eval is None or missing:
        reason = f"champion v{version} has no readable evaluation{f' of {missing}' if missing else ''}"
        return {**decision, "promoted": False, "wins": [], "reason": f"{reason}: not promoted (fail closed)"}
    if champion_on != judged_on:
        return {**decision, "promoted": False, "wins": [],
                "reason": f"champion v{version} was judged on {champion_on}, this model on {judged_on}: "
                          "not comparable, not promoted"}
    promote, won = gate(evaluation, champion_eval, gate_metrics, min_wins)
    return {**decision, "promoted": promote, "wins": won,
            "reason": f"won {len(won)} of {len(gate_metrics)} against champion v{version}"}


def register(tracker: Tracker, checkpoint: Path, *, name: str, evaluation: dict[str, float],
             judged_on: dict[str, str], gate_metrics: list[str], min_wins: int, card: str,
             tags: dict[str, str]) -> dict[str, Any]:
    """Registers a version, aliases it ``challenger``, promotes it to ``champion`` through the gate.

    ``judged_on`` names what the evaluation was made on (``{"set": …, "metrics": …}``); it is recorded on the
    version and must equal the champion's for a comparison. Everything is checked before the version is created,
    and the champion alias moves last, after the version's tags are written.
    """
    missing = [m for m in gate_metrics if not isinstance(evaluation.get(m), (int, float))]
    if missing:
        raise InputError(f"the evaluation has no {missing} for the gate; it has {sorted(evaluation)}")
    client = tracker.client
    decision = judge(evaluation, judged_on, champion_record(client, name), gate_metrics, min_wins)
    version = log_pyfunc(tracker, checkpoint, name)
    decision["version"] = version
    for key, value in {**tags, "evaluation": json.dumps(evaluation, sort_keys=True),
                       "judged_on": json.dumps(judged_on, sort_keys=True),
                       "decision": json.dumps(decision, sort_keys=True)}.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=card)
    client.set_registered_model_alias(name, "challenger", version)
    if decision["promoted"]:
        client.set_registered_model_alias(name, "champion", version)
    return decision


def resolve_checkpoint(uri: str, cache: Path | None = None) -> Path:
    """A registry or run URI of a cs2fusion pyfunc model → a local copy of its checkpoint, kept in ``cache``
    (default ``~/.cache/cs2fusion/models``) under its sha256; the rest of the download is removed."""
    import mlflow

    from cs2fusion.data.manifest import sha256_file

    cache = cache or Path.home() / ".cache" / "cs2fusion" / "models"
    with tempfile.TemporaryDirectory(prefix="cs2f") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        found = sorted((folder / "artifacts").glob("*.safetensors"))  # the pyfunc's checkpoint artifact
        if len(found) != 1:
            raise FileNotFoundError(f"{uri}: not one cs2fusion checkpoint among the model's artifacts ({found})")
        cache.mkdir(parents=True, exist_ok=True)
        kept = cache / f"{sha256_file(found[0])}.safetensors"
        if not kept.is_file():
            partial = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
            shutil.copyfile(found[0], partial)
            os.replace(partial, kept)
    return kept
