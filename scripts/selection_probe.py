"""Does a fusion select a source per pixel or blend them? Measured on fused outputs where the sources differ clearly
(|IR − visible| > ``--gap`` grey levels): the share of pixels within ``--near`` grey levels of the brighter source,
of the darker one, and strictly between them (20–80 % of the way), plus the mean |F − max(IR, vis)| over the image.

Run: python scripts/selection_probe.py --ir ../shared/data/tno40/ir --vi ../shared/data/tno40/vi
--fused ours=/tmp/ours/tno40 --fused published=/tmp/published/tno40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cs2fusion.data.pairs import find_pairs
from cs2fusion.io import read_grey


def selection(ir: np.ndarray, vi: np.ndarray, fused: np.ndarray, *, gap: float, near: float) -> dict[str, float]:
    """Selection statistics of one fused image (all float grey levels, same shape)."""
    hi, lo = np.maximum(ir, vi), np.minimum(ir, vi)
    clear = (hi - lo) > gap
    where = (fused - lo) / np.maximum(hi - lo, 1e-6)
    return {"near brighter": float((np.abs(fused - hi) < near)[clear].mean()),
            "near darker": float((np.abs(fused - lo) < near)[clear].mean()),
            "between 20-80 %": float(((where > 0.2) & (where < 0.8))[clear].mean()),
            "mean |F - max|": float(np.abs(fused - hi).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ir", type=Path, required=True)
    p.add_argument("--vi", type=Path, required=True)
    p.add_argument("--fused", action="append", required=True, help="NAME=FOLDER, repeatable")
    p.add_argument("--gap", type=float, default=30.0)
    p.add_argument("--near", type=float, default=8.0)
    args = p.parse_args()
    pairs = find_pairs(args.ir, args.vi)
    print("| fusion | " + " | ".join(("near brighter", "near darker", "between 20-80 %", "mean |F - max|")) + " |")
    print("|---|---|---|---|---|")
    for spec in args.fused:
        label, _, folder = spec.partition("=")
        rows = [selection(*(read_grey(path).astype(np.float64) for path in (pair.ir, pair.vi,
                                                                            Path(folder) / f"{pair.id}.png")),
                          gap=args.gap, near=args.near)
                for pair in pairs]
        means = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |")


if __name__ == "__main__":
    main()
