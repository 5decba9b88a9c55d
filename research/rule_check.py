"""Rule 2 of docs/research/multi-sensor.md on the validation pairs: each model's nine main metrics and composite per
set (the training's own ``val/score``: mean of model / pixel-mean fusion), and, for each candidate against the
reference (the first ``--model``), checks (a)–(c) of the rule per set. Check (d), by eye, is on the grids.

    python research/rule_check.py --shards presets/multisensor/data/shards \
        --set roadscene/val --set msrs/val --set roadscene/val+msrs/val \
        --model default=presets/roadscene/models/model.safetensors \
        --model ft=presets/multisensor/models/model.safetensors
"""

from __future__ import annotations

import argparse
import logging

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.config import MAIN_METRICS
from cs2fusion.data.shards import iter_eval, set_files
from cs2fusion.inference.fuser import Fuser, FuseOptions
from cs2fusion.validation import COMPOSITE, baseline_scores, selection_score, validate

DETAIL = ("EN", "SD", "SF", "AG", "SCD")  # (b): at least 3 of these rise
FIDELITY = ("MI", "VIF", "Qabf", "SSIM")  # (c): none falls by more than 2 % relative

log = logging.getLogger("rule_check")


def checks(candidate: dict[str, float], reference: dict[str, float]) -> dict[str, bool]:
    """Rule 2 (a)–(c) of one set: composite not below, ≥ 3 detail metrics up, no fidelity metric down > 2 %."""
    return {"a": candidate["composite"] >= reference["composite"],
            "b": sum(candidate[m] > reference[m] for m in DETAIL) >= 3,
            "c": all(candidate[m] >= 0.98 * reference[m] for m in FIDELITY)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--set", action="append", required=True, dest="sets")
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT; the first is the reference")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = dict(m.split("=", 1) for m in args.model)
    fusers = {name: Fuser(load_checkpoint(path).backbone, options=FuseOptions(winograd=False))
              for name, path in models.items()}
    reference = next(iter(models))
    lines = ["| set | model | " + " | ".join(MAIN_METRICS) + " | composite | rule 2 (a b c) |",
             "|---|---|" + "---|" * (len(MAIN_METRICS) + 2)]
    for name in args.sets:
        pairs = [(ir, vi) for _, ir, vi in iter_eval(set_files(args.shards, name))]
        base = baseline_scores(pairs)
        table = {}
        for model, fuser in fusers.items():
            scores, _ = validate(fuser, pairs)
            table[model] = {**scores, "composite": selection_score(scores, base, COMPOSITE)}
            log.info("%s %s: composite %.4f", name, model, table[model]["composite"])
        for model, row in table.items():
            verdict = "" if model == reference else " ".join(
                f"{k}:{'yes' if ok else 'no'}" for k, ok in checks(row, table[reference]).items())
            cells = " | ".join(f"{row[m]:.4g}" for m in MAIN_METRICS)
            lines.append(f"| {name} ({len(pairs)}) | {model} | {cells} | {row['composite']:.4f} | {verdict} |")
    print("\n".join(lines))  # noqa: T201 - the table is this script's output


if __name__ == "__main__":
    main()
