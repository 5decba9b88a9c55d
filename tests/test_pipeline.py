"""The whole pipeline through real ``dvc repro`` in a temp copy of the project, on a tiny real-data config."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cs2fusion.io import read_image
from tests.conftest import DATA, REPO, SHARED
from tests.tiny import TINY, env

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.data]


def _run(cwd: Path, *cmd: str, with_stderr: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + (proc.stderr if with_stderr else "")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    (root / "shared").symlink_to(SHARED)  # ../shared as in a real checkout
    dst = root / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in TINY.items():  # merged, so every key stays settable with `dvc exp run -S`
        params[section] = {**params.get(section, {}), **values}
    params["synth"].update({"pairs": 2, "width": 48, "height": 48})
    params["train"].update({"epochs": 1, "max_steps_per_epoch": 2, "val_set": "tno/test"})
    params["prepare"]["datasets"][0]["root"] = str(DATA / "tno40")
    peers = root / "peers"  # two of the published methods' own outputs on tno40, ranked beside ours
    for method in ("SeAFusion", "IFCNN"):
        peers.mkdir(exist_ok=True)
        (peers / method).symlink_to(DATA / "peers" / "tno40" / method)
    params["evaluate"] = {"primary_set": "tno/test", "report_samples": 2, "peers": {"tno/test": str(peers)},
                          "crops": 2}
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = (dst / "dvc.yaml").read_text().replace("reports/samples_demo-test.png", "reports/samples_tno-test.png")
    (dst / "dvc.yaml").write_text(dvc_yaml)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"]):
        _run(dst, *cmd)
    return dst


def test_dvc_repro_end_to_end(project: Path) -> None:
    out = _run(project, "dvc", "repro", "dvc.yaml")
    for stage in ("synth", "prepare", "shard", "train", "fuse", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out, stage
    for noise in ("PlacementGroupCleaner", "TrainingReport(", "UserWarning", "Warning:", "Traceback"):
        assert noise not in out, f"{noise!r} in the output:\n{out[-4000:]}"
    assert "epoch 1/1: loss/backbone" in out  # the driver's progress (a live bar on a terminal, lines here)
    evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
    assert set(evaluation["sets"]["tno/test"]) == {"ours", "published", "mean", "max", "SeAFusion", "IFCNN"}
    board = evaluation["leaderboards"]["tno/test"]  # the baselines are not ranked
    assert set(board) == {"ours", "published", "SeAFusion", "IFCNN"}
    assert sorted(entry["place"] for entry in board.values()) == [1, 2, 3, 4]
    assert "| ours |" in (project / "reports" / "leaderboard.md").read_text()
    crops = read_image(project / "reports" / "crops_tno-test.png")  # a header, 2 pairs × (IR, visible, 4 methods)
    assert crops.shape[0] == 14 + 4 + 2 * 128 + 4
    assert (project / "reports" / "crops_tno-test.txt").read_text().count("|") == 5
    assert len(list((project / "fused" / "ours" / "tno-test").glob("*.png"))) == 10
    assert json.loads((project / "metrics" / "register.json").read_text())["promoted"] is True

    again = _run(project, "dvc", "repro", "dvc.yaml")
    assert "Running stage" not in again  # nothing to do

    # an edit to a shared base module (the colour conversion) makes every stage that imports it stale
    color = project / "cs2fusion" / "color.py"
    original = color.read_text()
    color.write_text(original + "# edited\n")
    stale = json.loads(_run(project, "dvc", "status", "--json", with_stderr=False))
    color.write_text(original)
    assert {"synth", "prepare", "shard", "train", "fuse", "evaluate", "register"} <= set(stale), sorted(stale)

    shown = _run(project, "dvc", "metrics", "show")
    assert "metrics/evaluate.json" in shown and "Qabf" in shown
    _run(project, "dvc", "plots", "show", "-o", "dvc_plots")
    assert (project / "dvc_plots" / "index.html").is_file()

    # a training parameter makes train stale (and so what reads its model), nothing before it
    params = project / "params.yaml"
    original = params.read_text()
    params.write_text(_with(original, "train", seed=1))
    stale = set(json.loads(_run(project, "dvc", "status", "--json", with_stderr=False)))
    params.write_text(original)
    assert "train" in stale and not stale & {"synth", "prepare", "shard"}, sorted(stale)

    # an experiment reruns the stage of the parameter it sets and nothing before it (an evaluation parameter: a
    # second training would repeat what the first repro tested, at most of this test's cost)
    exp = _run(project, "dvc", "exp", "run", "-S", "evaluate.report_samples=1")
    assert "Running stage 'evaluate'" in exp
    for stage in ("synth", "prepare", "shard", "train", "fuse"):
        assert f"Running stage '{stage}'" not in exp, stage
    rows = list(csv.DictReader(io.StringIO(_run(project, "dvc", "exp", "show", "--csv", with_stderr=False))))
    samples = next(k for k in rows[0] if k.endswith("evaluate.report_samples"))
    assert sorted({row[samples] for row in rows}) == ["1", "2"]  # the baseline and the experiment


def _with(text: str, section: str, **values: object) -> str:
    """params.yaml text with ``values`` set in ``section``."""
    params = yaml.safe_load(text)
    params[section].update(values)
    return yaml.safe_dump(params, sort_keys=False)
