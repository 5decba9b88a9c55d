"""Does a fusion select a source per pixel or blend them? Measured on fused outputs where the sources differ clearly
(|IR − visible| > ``--gap`` grey levels): the share of pixels within ``--near`` grey levels of the brighter source,
of the darker one, and strictly between them (20–80 % of the way), plus the mean |F − max(IR, vis)| over the image.
The darker share is split by which source is the darker one there: ``darker IR`` (e.g. a dark infrared road marking
taken over the white visible one) and ``darker vis`` (e.g. a dark visible background over a warm infrared target).

``--overlay DIR`` writes, per fusion, its pair with the most darker-source picks as one row: IR | visible | fused |
fused with those picks in red (where to look by eye).

Run: python research/selection_probe.py --ir ../shared/data/tno40/ir --vi ../shared/data/tno40/vi
--fused ours=/tmp/ours/tno40 --fused published=/tmp/published/tno40 [--overlay /tmp/overlays]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cs2fusion.data.pairs import find_pairs
from cs2fusion.io import read_grey, write_png
from cs2fusion.validation import SELECT_GAP, SELECT_NEAR, mean_scores, selection_stats


def _grey(path: Path) -> np.ndarray:
    return read_grey(path).astype(np.float64)


def darker_picks(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray, *, gap: float, near: float) -> np.ndarray:
    """Where the sources clearly differ and the fusion is near the darker one."""
    return (np.abs(ir - vi) > gap) & (np.abs(fused - np.minimum(ir, vi)) < near)


def darker_split(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray, *, gap: float, near: float) -> dict[str, float]:
    """Shares of the clearly differing pixels where the fusion is near the darker source, by which source that is."""
    clear = np.abs(ir - vi) > gap
    if not clear.any():
        return {"darker_ir": float("nan"), "darker_vis": float("nan")}
    picks = darker_picks(fused, ir, vi, gap=gap, near=near)
    return {"darker_ir": float((picks & (ir < vi))[clear].mean()),
            "darker_vis": float((picks & (vi < ir))[clear].mean())}


def darker_overlay(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray, *, gap: float, near: float) -> np.ndarray:
    """One RGB row: IR | visible | fused | fused with its darker-source picks (clearly differing pixels) in red."""
    picks = darker_picks(fused, ir, vi, gap=gap, near=near)
    marked = np.repeat(fused[..., None], 3, axis=-1)
    marked[picks] = (255.0, 0.0, 0.0)
    row = [np.repeat(x[..., None], 3, axis=-1) for x in (ir, vi, fused)] + [marked]
    return np.concatenate(row, axis=1).clip(0, 255).astype(np.uint8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ir", type=Path, required=True)
    p.add_argument("--vi", type=Path, required=True)
    p.add_argument("--fused", action="append", required=True, help="NAME=FOLDER, repeatable")
    p.add_argument("--gap", type=float, default=SELECT_GAP)
    p.add_argument("--near", type=float, default=SELECT_NEAR)
    p.add_argument("--overlay", type=Path, default=None, help="folder for each fusion's row of darker-source picks")
    args = p.parse_args()
    pairs = find_pairs(args.ir, args.vi)
    columns = ("near brighter", "near darker", "20-80 % between", "mean |F - max|", "darker IR", "darker vis")
    print("| fusion | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for spec in args.fused:
        label, _, folder = spec.partition("=")
        rows = []
        for pair in pairs:
            fused, ir, vi = _grey(Path(folder) / f"{pair.id}.png"), _grey(pair.ir), _grey(pair.vi)
            rows.append({**selection_stats(fused, ir, vi, gap=args.gap, near=args.near),
                         **darker_split(fused, ir, vi, gap=args.gap, near=args.near)})
        means = mean_scores(rows)
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |")
        if args.overlay:
            worst = pairs[int(np.nanargmax([r["near_darker"] for r in rows]))]
            write_png(args.overlay / f"{label}-{worst.id}.png",
                      darker_overlay(_grey(Path(folder) / f"{worst.id}.png"), _grey(worst.ir), _grey(worst.vi),
                                     gap=args.gap, near=args.near))


if __name__ == "__main__":
    main()
