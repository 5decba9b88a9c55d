"""Carries an unfinished training run to the next sitting or machine through the DVC remote.

A training stage's run state becomes a DVC output only when the stage ends (``dvc commit`` needs every output, the
model too). Until then ``save`` snapshots the run folder to ``<preset>/carry/<run>``, tracked by its own ``.dvc`` file
and pushed to the default remote (the repository's ``dvc-remote/``); ``restore`` pulls the snapshot back into the run
folder, where the next ``dvc repro`` resumes the run from its latest checkpoint. Both hold the run's lease, so no
trainer writes the folder meanwhile.

    python -m pipeline.carry save presets/multisensor/state/multisensor-ft      # then git add the .dvc, dvc-remote/
    python -m pipeline.carry restore presets/multisensor/state/multisensor-ft   # next sitting; then dvc repro
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from cs2fusion.io import InputError
from pipeline.common import clean_errors, setup_logging
from pipeline.lease import RunLease

log = logging.getLogger("pipeline.carry")


def carry_folder(run_dir: Path) -> Path:
    """Where a run's snapshot lives: ``<preset>/carry/<run>`` for ``<preset>/state/<run>``."""
    return run_dir.parent.parent / "carry" / run_dir.name


def _dvc(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise InputError(f"dvc {' '.join(args)}: {lines[-1] if lines else f'exit {done.returncode}'}")


def _replace(source: Path, target: Path) -> None:
    """``target`` becomes a copy of ``source``, switched in by a rename (never half-written)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp, symlinks=True)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def save(run_dir: Path, root: Path) -> Path:
    """Snapshots ``run_dir`` into its carry folder, tracks it (``dvc add``) and pushes it; returns the ``.dvc`` file."""
    if not (run_dir / "fingerprint").is_file():
        raise InputError(f"{run_dir}: not a training run folder (no fingerprint)")
    carry = carry_folder(run_dir)
    with RunLease(str(run_dir)):
        _replace(run_dir, carry)
    _dvc("add", str(carry.relative_to(root)), cwd=root)
    _dvc("push", f"{carry.relative_to(root)}.dvc", cwd=root)
    log.info("saved %s as %s.dvc (pushed); commit it and the remote folder with git", run_dir, carry)
    return carry.with_name(carry.name + ".dvc")


def restore(run_dir: Path, root: Path) -> None:
    """Pulls the run's snapshot and puts it in ``run_dir`` (refused where a run folder is already there)."""
    carry = carry_folder(run_dir)
    if not carry.with_name(carry.name + ".dvc").is_file():
        raise InputError(f"{carry}.dvc: no saved snapshot of {run_dir.name}")
    if run_dir.exists():
        raise InputError(f"{run_dir}: a run folder is already there; move it aside to restore the snapshot")
    _dvc("pull", f"{carry.relative_to(root)}.dvc", cwd=root)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with RunLease(str(run_dir)):
        _replace(carry, run_dir)
    log.info("restored %s from %s.dvc: dvc repro resumes it", run_dir, carry)


@clean_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("save", "restore"))
    p.add_argument("run_dir", type=Path, help="the run folder: <train.storage_path>/<train.run_name>")
    p.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logs too")
    args = p.parse_args()
    setup_logging(args)
    root = Path.cwd().resolve()
    run_dir = (root / args.run_dir).resolve()
    if not run_dir.is_relative_to(root):
        raise InputError(f"{args.run_dir}: not inside the repository {root}")
    (save if args.action == "save" else restore)(run_dir, root)


if __name__ == "__main__":
    main()
