"""Which ways of changing a fused image buy the board's detail metrics cheaply? Measured on outputs, before any training.

The detail terms tried for the two-sensor model all trade about 1 % of MI for 1 % of SF on RoadScene's validation pairs
(docs/research/multi-sensor.md). This applies fixed transforms to one model's fused luminance (in float, before
rounding; colour kept through BT.601) and prints the nine main metrics and the composite per set for each:

- ``gain s``: a global contrast gain about the image mean, m + s·(F − m); ``gain s @128`` about mid-grey instead (a
  pointwise tone curve); ``gain s @σ16`` about a local mean, G_16 F (a large-scale unsharp mask);
- ``unsharp λ``: the output's own detail amplified, F + λ·(F − G_σ F);
- ``detail λ``: the sources' detail that the output lacks added back, F + λ·(D_ir + D_vis − D_F), D_x = x − G_σ x.

A transform whose detail gain costs far less fidelity than the line is a direction a training term could aim at; the
transforms themselves are not a product feature.

    python research/direction_probe.py --shards presets/multisensor/data/shards --set roadscene/val --set msrs/val \
        --model presets/roadscene/models/model.safetensors
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import numpy as np
from scipy.ndimage import gaussian_filter

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.color import rgb_to_ycbcr_bt601_full, to_uint8, ycbcr_to_rgb_bt601_full
from cs2fusion.config import MAIN_METRICS
from cs2fusion.data.shards import iter_eval, set_files
from cs2fusion.inference.fuser import Fuser, FuseOptions
from cs2fusion.validation import COMPOSITE, baseline_scores, image_scores, mean_scores, selection_score

log = logging.getLogger("direction_probe")
Transform = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def transforms(sigma: float) -> dict[str, Transform]:
    """name → f(fused_y, ir, vis_y) → transformed fused_y, all float64."""
    def detail(x: np.ndarray) -> np.ndarray:
        return x - gaussian_filter(x, sigma, mode="reflect")

    def gain(s: float, pivot: Callable[[np.ndarray], np.ndarray | float]) -> Transform:
        def apply(f: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> np.ndarray:
            m = pivot(f)
            return m + s * (f - m)
        return apply

    def unsharp(lam: float) -> Transform:
        return lambda f, ir, vi: f + lam * detail(f)

    def missing_detail(lam: float) -> Transform:
        return lambda f, ir, vi: f + lam * (detail(ir) + detail(vi) - detail(f))

    return {"none": lambda f, ir, vi: f,
            **{f"gain {s}": gain(s, np.mean) for s in (1.05, 1.1)},
            **{f"gain {s} @128": gain(s, lambda f: 127.5) for s in (1.05, 1.1)},
            **{f"gain {s} @σ16": gain(s, lambda f: gaussian_filter(f, 16.0, mode="reflect")) for s in (1.05, 1.1)},
            **{f"unsharp {lam}": unsharp(lam) for lam in (0.25, 0.5)},
            **{f"detail {lam}": missing_detail(lam) for lam in (0.25, 0.5)}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--set", action="append", required=True, dest="sets")
    p.add_argument("--model", required=True, help="checkpoint whose outputs are transformed")
    p.add_argument("--sigma", type=float, default=2.0, help="Gaussian σ separating detail from base, pixels")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fuser = Fuser(load_checkpoint(args.model).backbone, options=FuseOptions(winograd=False))
    changes = transforms(args.sigma)
    lines = ["| set | transform | " + " | ".join(MAIN_METRICS) + " | composite |",
             "|---|---|" + "---|" * (len(MAIN_METRICS) + 1)]
    for name in args.sets:
        pairs = [(ir, vi) for _, ir, vi in iter_eval(set_files(args.shards, name))]
        base = baseline_scores(pairs)
        rows: dict[str, list[dict[str, float]]] = {}
        for ir, vi in pairs:
            y, cb, cr = rgb_to_ycbcr_bt601_full(vi) if vi.ndim == 3 else (vi.astype(np.float32), None, None)
            f, a, b = (x.astype(np.float64) for x in (fuser.fuse_y(vis_y=y, ir=ir), ir, y))
            for label, t in changes.items():
                g = t(f, a, b).astype(np.float32)
                out = to_uint8(g if cb is None else ycbcr_to_rgb_bt601_full(g, cb, cr))
                rows.setdefault(label, []).append(image_scores(out, ir, vi))
        log.info("%s: %d pairs", name, len(pairs))
        for label, scores in rows.items():
            s = mean_scores(scores)
            cells = " | ".join(f"{s[m]:.4g}" for m in MAIN_METRICS)
            lines.append(f"| {name} ({len(pairs)}) | {label} | {cells} | {selection_score(s, base, COMPOSITE):.4f} |")
    print("\n".join(lines))  # noqa: T201 - the table is this script's output


if __name__ == "__main__":
    main()
