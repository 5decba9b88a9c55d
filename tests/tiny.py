"""A tiny real-data project for pipeline tests: a few TNO pairs, small patches, short epochs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import DATA, REPO

TINY: dict[str, Any] = {
    "prepare": {"datasets": [{"name": "tno", "root": str(DATA / "tno40"), "ratio": {"train": 0.75, "test": 0.25}}]},
    "shard": {"train": ["tno/train"], "eval": ["tno/test"], "patch_size": 32, "stride": 96,
              "max_patches_per_image": 2, "max_samples_per_shard": 16},
    "train": {"epochs": 3, "batch_size": 4, "scaling": {"num_workers": 2, "loader_workers": 0},
              "tracking": {"log_every": 1}, "val_set": "tno/test", "val_samples": 1, "max_steps_per_epoch": 3},
    "cluster": {"shared_fs": True},  # the tests' Ray clusters run on this one machine
}


def write_params(folder: Path, **sections: dict[str, Any]) -> Path:
    """params.yaml = TINY with ``sections`` merged in (one level deep)."""
    params = {k: dict(v) for k, v in TINY.items()}
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


# `ray.init()` without an address attaches to the cluster that a `ray start` on this machine named in
# <RAY_TMPDIR or /tmp>/ray/ray_current_cluster (the tests' second node may write it there): the stages meant to start
# a local instance of their own look in a folder of this test process instead.
LOCAL_RAY_TMP = Path(tempfile.gettempdir()) / f"cs2f-ray-{os.getpid()}"


def env(**extra: str) -> dict[str, str]:
    """The environment for stage subprocesses (quiet, offline, the repo importable; without ``RAY_ADDRESS`` a
    local Ray instance of the stage's own)."""
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    out.update({"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
                "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"})
    if "RAY_ADDRESS" not in extra:
        out["RAY_TMPDIR"] = str(LOCAL_RAY_TMP)
    out.update(extra)
    return out


def stage(folder: Path, module: str, *args: str, timeout: int = 600, **env_extra: str) -> subprocess.CompletedProcess:
    """Runs ``python -m pipeline.<module> args`` in ``folder``; raises with its output on failure."""
    proc = subprocess.run([sys.executable, "-m", f"pipeline.{module}", *args], cwd=folder, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"pipeline.{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def prepare_and_shard(folder: Path) -> Path:
    """Runs the prepare and shard stages; returns the shard folder."""
    stage(folder, "prepare", "--out", "data/manifest.json")
    stage(folder, "shard", "--manifest", "data/manifest.json", "--out", "data/shards")
    return folder / "data" / "shards"


def demo_params(folder: Path, **scaling: Any) -> None:
    """The repository's params.yaml (the quick start's demo data set) with ``train.scaling`` overrides, in
    ``folder``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"epochs": 2, "max_steps_per_epoch": 5, "val_set": "", "keep": "last",
                            "init_from": str(REPO / params["train"]["init_from"])})
    params["train"]["tracking"]["log_every"] = 1
    params["train"]["scaling"].update({"max_failures": 2, **scaling})
    params["fuse"]["published"] = ""
    params["cluster"]["shared_fs"] = True  # one machine: every node sees the same paths
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
