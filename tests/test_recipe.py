"""The roadscene recipe as code: five phases as DVC stages, each starting from the previous one's model, the last one
shipped; their models and run state restored byte for byte from the in-repo DVC remote."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cs2fusion.config import load_params
from tests.conftest import REPO

PRESET = "presets/roadscene"
PHASES = [f"phase{n}" for n in range(1, 6)]
DVC = str(Path(sys.executable).parent / "dvc")


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / PRESET / "dvc.yaml").read_text())["stages"]


def _option(cmd: str, name: str) -> list[str]:
    words = shlex.split(cmd)
    return [words[i + 1] for i, w in enumerate(words) if w == name]


def _outs(stage: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


def test_each_phase_starts_from_the_previous_phases_model() -> None:
    """Phase N's params (the preset's file + phases/N.yaml, as its command reads them) start from phase N−1's model:
    that file is phase N's dep and phase N−1's out; phase 1 starts from random weights; the last phase's model is
    what fuse, evaluate, register and ship read; each phase's run state (storage_path/run_name) is a persisted
    out."""
    stages = _stages()
    assert [s for s in stages if s.startswith("phase")] == PHASES
    previous = ""
    for number, name in enumerate(PHASES):
        stage = stages[name]
        files = _option(stage["cmd"], "--params")
        assert files == [f"{PRESET}/params.yaml", f"{PRESET}/phases/{name[5:]}.yaml"]
        assert any(files[1] in p for p in stage["params"] if isinstance(p, dict))
        train = load_params(*(REPO / f for f in files)).train
        model = _option(stage["cmd"], "--out")[0]
        assert model in _outs(stage)
        assert train.init_from == previous
        if number:
            assert previous in stage["deps"] and previous in _outs(stages[PHASES[number - 1]])
        state = f"{train.storage_path}/{train.run_name}"
        assert {state: {"persist": True}} in stage["outs"]
        previous = model
    for later in ("fuse", "evaluate", "register", "ship"):
        assert _option(stages[later]["cmd"], "--model") in ([previous], [])
    assert _option(stages["fuse"]["cmd"], "--model") == [previous]
    assert _option(stages["ship"]["cmd"], "--model") == [previous]


def test_the_shipped_recipe_is_phase_5() -> None:
    """Phase 5's knobs (the shipped model's): l1 terms + max (μ 2) and max-gradient (γ 1) terms on a sharp map (mean
    ± 0.5 std), one epoch at 2e-4 / 2e-5 then ×0.1, from phase 4's model."""
    params = load_params(REPO / PRESET / "params.yaml", REPO / PRESET / "phases" / "5.yaml")
    train, loss = params.train, params.train.loss
    assert (params.model.map_norm, params.model.map_spread, loss.intensity) == ("robust", 0.5, "l1")
    assert (loss.max_weight, loss.grad_weight, loss.ssim_weight) == (2.0, 1.0, 150.0)
    assert (train.lr_backbone, train.lr_cpn, train.milestones, train.epochs) == (2e-4, 2e-5, (1,), 2)
    assert train.init_from == f"{PRESET}/models/phase4.safetensors"


@pytest.mark.data
def test_dvc_repro_dry_lists_the_phases_in_order() -> None:
    """``dvc repro --dry --force`` of the preset runs prepare, shard, the five phases, then fuse → ship."""
    out = subprocess.run([DVC, "repro", "--dry", "--force", f"{PRESET}/dvc.yaml"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    order = [line.split("'")[1].split(":")[-1] for line in out.splitlines() if line.startswith("Running stage")]
    # register and ship both follow evaluate and not each other: DVC may run them in either order
    assert order[:-2] == ["prepare", "shard", *PHASES, "fuse", "evaluate"] and set(order[-2:]) == {"register", "ship"}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_a_fresh_clone_pulls_every_phase_byte_for_byte(tmp_path: Path) -> None:
    """``git clone`` + ``dvc pull`` of the phases from the default remote (a folder in the repository): every phase's
    model and run-state file has the md5 the lock records, and the shipped model (in git) is the lock's too."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    targets = [f"{PRESET}/dvc.yaml:{name}" for name in PHASES]
    subprocess.run([DVC, "pull", "-q", *targets], cwd=clone, check=True, capture_output=True)
    lock = yaml.safe_load((clone / PRESET / "dvc.lock").read_text())["stages"]
    checked = 0
    for name in PHASES:
        for out in lock[name]["outs"]:
            path = clone / out["path"]
            if out["md5"].endswith(".dir"):  # the manifest of a folder out lists each file's md5
                manifest = Path(clone / ".dvc" / "cache" / "files" / "md5" / out["md5"][:2] / out["md5"][2:])
                for entry in yaml.safe_load(manifest.read_text()):
                    assert _md5(path / entry["relpath"]) == entry["md5"], path / entry["relpath"]
                    checked += 1
            else:
                assert _md5(path) == out["md5"], path
                checked += 1
    (shipped,) = [o for o in lock["ship"]["outs"] if o["path"].endswith(".safetensors")]
    assert _md5(clone / shipped["path"]) == shipped["md5"]
    assert checked > 10
    shutil.rmtree(clone)
