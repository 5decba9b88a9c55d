"""Carrying an unfinished run through the DVC remote (pipeline.carry) with real DVC and git in a scratch repository."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.lease import RunLease
from tests.tiny import env

RUN = Path("presets/x/state/run")


def _run(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=repo, env=env(), capture_output=True, text=True,
                          timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_saved_run_comes_back_byte_for_byte_from_the_remote_alone(tmp_path: Path) -> None:
    """save snapshots the run folder, tracks and pushes it; on a clone that has only git's files and the remote folder
    restore brings it back byte for byte; restoring over a run folder, saving a folder that is not a run, and saving
    a run a live trainer holds are refused in one line."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"]):
        subprocess.run(cmd, cwd=repo, check=True)
    assert _run(repo, "dvc", "init", "-q").returncode == 0
    assert _run(repo, "dvc", "remote", "add", "-d", "local", "dvc-remote").returncode == 0
    run = repo / RUN
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "fingerprint").write_text("{}")
    (run / "checkpoint_000001" / "train_state.pt").write_bytes(bytes(range(256)) * 64)
    (run / "checkpoint_manager_snapshot.json").write_text('{"latest": "checkpoint_000001"}')
    (run.parent / ".gitignore").write_text("/run\n")  # a stage's output, as DVC ignores it
    before = _digest(run)

    saved = _run(repo, "pipeline.carry", "save", str(RUN))
    assert saved.returncode == 0, saved.stderr
    assert (repo / "presets/x/carry/run.dvc").is_file() and any((repo / "dvc-remote").rglob("*"))
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "state after epoch 1"], cwd=repo, check=True)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert not (clone / RUN).exists() and not (clone / "presets/x/carry/run").exists()
    restored = _run(clone, "pipeline.carry", "restore", str(RUN))
    assert restored.returncode == 0, restored.stderr
    assert _digest(clone / RUN) == before

    again = _run(clone, "pipeline.carry", "restore", str(RUN))
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {(clone / RUN).resolve()}: a run folder is already there; move it aside to restore the snapshot"]
    not_a_run = _run(clone, "pipeline.carry", "save", "presets/x")
    assert not_a_run.returncode == 2 and "not a training run folder" in not_a_run.stderr
    with RunLease(str((clone / RUN).resolve())):
        held = _run(clone, "pipeline.carry", "save", str(RUN))
    assert held.returncode == 2 and "is being trained by" in held.stderr
    assert _digest(clone / "presets/x/carry/run") == before  # the refused save left the snapshot as it was
    shutil.rmtree(clone / RUN)
