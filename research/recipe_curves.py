"""Loss and validation curves of a training run by epoch, from the history its latest checkpoint carries
(``history.jsonl``, written by ``pipeline.train``): they come with the committed run state, so they need no MLflow
store. Several run folders are the phases of one recipe, each ``FOLDER[:OFFSET]`` with the epochs before it.

Writes a PNG (backbone loss, CPN loss, validation composite, the fused image's source correlations) and prints a
Markdown table.

Run: python research/recipe_curves.py presets/roadscene/state/roadscene presets/roadscene/state/roadscene-tight:6
--out docs/img/recipe_curves.png --published-score 1.304
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.train import latest_checkpoint, read_history  # noqa: E402

log = logging.getLogger("recipe_curves")
PANELS = (("epoch/loss/backbone", "backbone loss"), ("epoch/loss/cpn", "CPN loss"),
          ("val/score", "validation composite"), ("val/corr_ir", "fused vs IR · vis (correlation)"))
COLUMNS = ("epoch/loss/backbone", "epoch/loss/cpn", "val/corr_ir", "val/corr_vis", "val/SD", "val/MI", "val/score",
           "epoch/perf/samples_per_s")


def phase_rows(spec: str) -> tuple[str, list[dict[str, float]]]:
    """(name, rows with the recipe's epoch numbers) of ``FOLDER[:OFFSET]``: its latest checkpoint's history."""
    folder, _, offset = spec.partition(":")
    rows = read_history(latest_checkpoint(folder))
    if not rows:
        raise SystemExit(f"{folder}: its latest checkpoint carries no history.jsonl")
    return Path(folder).name, [{**row, "epoch": row["epoch"] + int(offset or 0)} for row in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run state folders in order, FOLDER[:EPOCHS_BEFORE]")
    p.add_argument("--out", type=Path, required=True, help="the PNG")
    p.add_argument("--published-score", type=float, default=None,
                   help="the published weights' validation composite, drawn as a line")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    phases = [phase_rows(spec) for spec in args.runs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for name, rows in phases:
        epochs = [r["epoch"] for r in rows]
        for ax, (key, title) in zip(axes, PANELS):
            ax.plot(epochs, [r.get(key, float("nan")) for r in rows], "o-", ms=3, label=name)
            if key == "val/corr_ir":
                ax.plot(epochs, [r.get("val/corr_vis", float("nan")) for r in rows], "s--", ms=3, label=f"{name} (vis)")
            ax.set(title=title, xlabel="epoch")
    if args.published_score is not None:
        axes[2].axhline(args.published_score, color="grey", ls=":", label="published weights")
        axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=7)
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    log.info("wrote %s", args.out)
    print("| run | epoch | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name, rows in phases:
        for r in rows:
            cells = [f"{r[c]:.4g}" if c in r else "" for c in COLUMNS]
            print(f"| {name} | {r['epoch']:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
