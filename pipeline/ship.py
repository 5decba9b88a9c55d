"""Stage ``ship`` (presets): a trained checkpoint becomes the package's default pretrained model.

Writes the backbone alone (the CPN is for training only) with the training provenance kept in its metadata,
and a model card: the generated card (data, params, run, evaluation), then the preset's hand-written notes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cs2fusion.checkpoint import load_checkpoint, save_checkpoint
from cs2fusion.io import write_text
from pipeline.common import clean_errors, parser, setup
from pipeline.register import model_card

log = logging.getLogger("pipeline.ship")
PROVENANCE = ("source", "epoch", "step", "selection", "val_score", "step_order", "mlflow_run_id", "git_commit",
              "shards_sha256")


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from the train stage")
    p.add_argument("--evaluation", type=Path, required=True, help="metrics JSON of the evaluate stage")
    p.add_argument("--notes", type=Path, required=True, help="hand-written part of the model card (Markdown)")
    p.add_argument("--out", type=Path, required=True, help="the shipped checkpoint (.safetensors)")
    p.add_argument("--card", type=Path, required=True, help="the model card (Markdown)")
    args = p.parse_args()
    params = setup(args)
    ckpt = load_checkpoint(args.model)
    provenance = {k: ckpt.meta[k] for k in PROVENANCE if k in ckpt.meta}
    save_checkpoint(args.out, ckpt.backbone, None, **provenance, shipped_from=str(args.model))
    evaluation = json.loads(args.evaluation.read_text())
    card = model_card(params, ckpt.meta, evaluation).rstrip() + "\n\n" + args.notes.read_text()
    write_text(args.card, card)
    log.info("shipped %s (%d bytes) and %s", args.out, args.out.stat().st_size, args.card)


if __name__ == "__main__":
    main()
