"""Stage ``ship`` (presets): a trained checkpoint becomes the package's default pretrained model.

Writes the backbone alone (the CPN is for training only) with the training provenance kept in its metadata,
a model card (the generated card: data, params, run, evaluation; then the preset's hand-written notes) and, with
``--report``, the evaluate stage's side-by-side pictures (IR | visible | ours | published) beside the card's links.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from cs2fusion.checkpoint import load_checkpoint, save_checkpoint
from cs2fusion.io import InputError, atomic_path, write_text
from pipeline.common import clean_errors, parser, setup
from pipeline.register import model_card

log = logging.getLogger("pipeline.ship")
PROVENANCE = ("source", "epoch", "step", "selection", "val_score", "step_order", "mlflow_run_id", "git_commit",
              "shards_sha256")


def ship_pictures(report: Path, pictures: Path, stem: str) -> list[Path]:
    """Copies the evaluate stage's ``samples_<set>.png`` into ``pictures`` as ``<stem>_<set>.png`` (each atomically)."""
    samples = sorted(report.glob("samples_*.png"))
    if not samples:
        raise InputError(f"{report}: no samples_*.png (run the evaluate stage)")
    out = []
    for path in samples:
        target = pictures / f"{stem}_{path.stem.removeprefix('samples_')}.png"
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
        out.append(target)
    return out


def _pictures_section(pictures: list[Path], card: Path) -> str:
    """The card's links to the pictures, relative to the card."""
    lines = ["## Side by side", "",
             "Columns: IR | visible | this model | the published weights (evaluation pairs).", ""]
    links = [f"![{p.stem}]({Path(os.path.relpath(p.resolve(), card.parent.resolve())).as_posix()})" for p in pictures]
    return "\n".join(lines + links) + "\n\n"


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from the train stage")
    p.add_argument("--evaluation", type=Path, required=True, help="metrics JSON of the evaluate stage")
    p.add_argument("--notes", type=Path, required=True, help="hand-written part of the model card (Markdown)")
    p.add_argument("--out", type=Path, required=True, help="the shipped checkpoint (.safetensors)")
    p.add_argument("--card", type=Path, required=True, help="the model card (Markdown)")
    p.add_argument("--report", type=Path, default=None, help="the evaluate stage's report folder (pictures)")
    p.add_argument("--pictures", type=Path, default=None, help="where the side-by-side pictures go (with --report)")
    args = p.parse_args()
    params = setup(args)
    if (args.report is None) != (args.pictures is None):
        raise InputError("--report and --pictures go together")
    ckpt = load_checkpoint(args.model)
    evaluation = json.loads(args.evaluation.read_text())
    pictures = ship_pictures(args.report, args.pictures, args.out.stem) if args.report else []
    provenance = {k: ckpt.meta[k] for k in PROVENANCE if k in ckpt.meta}
    save_checkpoint(args.out, ckpt.backbone, None, **provenance, shipped_from=str(args.model))
    card = model_card(params, ckpt.meta, evaluation).rstrip() + "\n\n"
    card += (_pictures_section(pictures, args.card) if pictures else "") + args.notes.read_text()
    write_text(args.card, card)
    log.info("shipped %s (%d bytes) and %s", args.out, args.out.stat().st_size, args.card)


if __name__ == "__main__":
    main()
