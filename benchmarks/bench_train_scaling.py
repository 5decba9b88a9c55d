"""Training throughput on this machine (issue 4): 1 Ray worker × 2 threads vs 2 workers × 1 thread (DDP), with
the data loader's share of step time. Real RoadScene patches (128×128), global batch 16, a few steps each.
Run: python -m benchmarks.bench_train_scaling   (starts a local Ray per configuration, ~3 min)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import DATA, REPO, report

CONFIGS = {
    "1 worker x 2 threads": {"num_workers": 1, "threads_per_worker": 2, "cpus_per_worker": 2.0},
    "2 workers x 1 thread": {"num_workers": 2, "threads_per_worker": 1, "cpus_per_worker": 1.0},
}


def _stage(folder: Path, *args: str) -> None:
    env = {"RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO)}
    import os

    subprocess.run([sys.executable, "-m", *args], cwd=folder, env={**os.environ, **env}, check=True,
                   capture_output=True, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = {
            "prepare": {"datasets": [{"name": "rs", "root": str(DATA / "roadscene"),
                                      "lists": {"train": str(DATA / "roadscene/splits/auif_train180.txt")}}]},
            "shard": {"train": ["rs/train"], "patch_size": 128, "stride": 128, "max_patches_per_image": 1},
            "train": {"epochs": 1, "batch_size": 16, "max_steps_per_epoch": args.steps, "loader_workers": 0,
                      "log_every": 1000},
        }
        (folder / "params.yaml").write_text(yaml.safe_dump(base))
        _stage(folder, "pipeline.prepare", "--out", "manifest.json")
        _stage(folder, "pipeline.shard", "--manifest", "manifest.json", "--out", "shards")
        for name, scaling in CONFIGS.items():
            params = {**base, "train": {**base["train"], **scaling}}
            (folder / "params.yaml").write_text(yaml.safe_dump(params))
            _stage(folder, "pipeline.train", "--shards", "shards", "--out", "m.safetensors", "--metrics", "m.json")
            m = json.loads((folder / "m.json").read_text())
            rows.append({"config": name, "samples/s": m["epoch/perf/samples_per_s"],
                         "data loader share": m["epoch/perf/data_fraction"]})
    rows.append({"config": "ratio (2 workers / 1 worker)", "samples/s": rows[1]["samples/s"] / rows[0]["samples/s"]})
    report(f"training throughput, batch 16, 128x128 patches, {args.steps} steps (first step included)", rows)


if __name__ == "__main__":
    main()
