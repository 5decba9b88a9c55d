"""The ship stage: a training checkpoint becomes a backbone-only model with its provenance and a model card."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from cs2fusion.checkpoint import load_checkpoint, read_meta, save_checkpoint
from cs2fusion.io import read_image, write_png
from cs2fusion.metrics import ALL_METRICS
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from tests.conftest import REPO


def _ship(tmp_path: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    metrics = {m: 1.0 for m in ALL_METRICS}
    evaluation = {"primary_set": "rs/test",
                  "sets": {"rs/test": {"ours": {**metrics, "n": 2}, "published": {**metrics, "EN": 2.0, "n": 2}}}}
    (tmp_path / "evaluate.json").write_text(json.dumps(evaluation))
    (tmp_path / "notes.md").write_text("## Limitations\n\nTrained on RoadScene for a test.\n")
    return subprocess.run(
        [sys.executable, "-m", "pipeline.ship", "--params", str(REPO / "params.yaml"), "--model", str(model),
         "--evaluation", str(tmp_path / "evaluate.json"), "--notes", str(tmp_path / "notes.md"),
         "--out", str(tmp_path / "shipped.safetensors"), "--card", str(tmp_path / "CARD.md"), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_ship_drops_cpn_keeps_provenance_and_writes_card(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = Backbone()
    trained = tmp_path / "trained.safetensors"
    save_checkpoint(trained, backbone, CompensationPerceptionNetwork(), source="cs2fusion train stage", epoch=2,
                    step=484, mlflow_run_id="0123abcd", git_commit="cafe", shards_sha256="beef")
    proc = _ship(tmp_path, trained)
    assert proc.returncode == 0, proc.stderr

    meta = read_meta(tmp_path / "shipped.safetensors")
    assert not meta["has_cpn"]
    assert {k: meta[k] for k in ("source", "epoch", "step", "mlflow_run_id", "git_commit")} == {
        "source": "cs2fusion train stage", "epoch": 2, "step": 484, "mlflow_run_id": "0123abcd", "git_commit": "cafe"}
    shipped = load_checkpoint(tmp_path / "shipped.safetensors").backbone.state_dict()
    for key, value in backbone.state_dict().items():
        assert torch.equal(shipped[key], value), key

    card = (tmp_path / "CARD.md").read_text()
    assert "0123abcd" in card and "| published | **2** |" in card  # the run and the evaluation table
    assert card.rstrip().endswith("Trained on RoadScene for a test.")  # the hand-written notes close it


def test_ship_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path) -> None:
    proc = _ship(tmp_path, tmp_path / "absent.safetensors")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'absent.safetensors'}: no such checkpoint"]
    assert not (tmp_path / "shipped.safetensors").exists() and not (tmp_path / "CARD.md").exists()


def test_ship_copies_the_side_by_side_pictures_and_links_them(tmp_path: Path) -> None:
    trained = tmp_path / "trained.safetensors"
    save_checkpoint(trained, Backbone(), CompensationPerceptionNetwork(), source="cs2fusion train stage")
    report, pictures = tmp_path / "reports", tmp_path / "docs" / "images"
    picture = np.random.default_rng(0).integers(0, 256, (8, 20, 3), dtype=np.uint8)
    write_png(report / "samples_tno40.png", picture)
    proc = _ship(tmp_path, trained, "--report", str(report), "--pictures", str(pictures))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(read_image(pictures / "shipped_tno40.png"), picture)
    assert "![shipped_tno40](docs/images/shipped_tno40.png)" in (tmp_path / "CARD.md").read_text()


def test_ship_without_pictures_in_the_report_writes_nothing(tmp_path: Path) -> None:
    trained = tmp_path / "trained.safetensors"
    save_checkpoint(trained, Backbone(), CompensationPerceptionNetwork(), source="cs2fusion train stage")
    (tmp_path / "reports").mkdir()
    proc = _ship(tmp_path, trained, "--report", str(tmp_path / "reports"), "--pictures", str(tmp_path / "pics"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'reports'}: no samples_*.png (run the evaluate stage)"]
    assert not (tmp_path / "shipped.safetensors").exists() and not (tmp_path / "CARD.md").exists()
