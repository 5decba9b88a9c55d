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
from cs2fusion.validation import SELECT_GAP, SELECT_NEAR, mean_scores, selection_stats


def _grey(path: Path) -> np.ndarray:
    return read_grey(path).astype(np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ir", type=Path, required=True)
    p.add_argument("--vi", type=Path, required=True)
    p.add_argument("--fused", action="append", required=True, help="NAME=FOLDER, repeatable")
    p.add_argument("--gap", type=float, default=SELECT_GAP)
    p.add_argument("--near", type=float, default=SELECT_NEAR)
    args = p.parse_args()
    pairs = find_pairs(args.ir, args.vi)
    print("| fusion | " + " | ".join(("near brighter", "near darker", "20-80 % between", "mean |F - max|")) + " |")
    print("|---|---|---|---|---|")
    for spec in args.fused:
        label, _, folder = spec.partition("=")
        means = mean_scores(selection_stats(_grey(Path(folder) / f"{pair.id}.png"), _grey(pair.ir), _grey(pair.vi),
                                            gap=args.gap, near=args.near) for pair in pairs)
        print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in means.values()) + " |")


if __name__ == "__main__":
    main()
