"""Where does a detail-trained candidate lose fidelity? Splice its output into the reference's by region and measure.

Regions by which source carries more local contrast (σ over a ``--window``² box, :func:`cs2fusion.losses.local_std`):
``vis`` where σ(vis) > σ(ir), ``ir`` elsewhere. For each set it prints the nine main metrics, MI per source and the
composite of: the reference, the candidate, the candidate only in the visible region (reference elsewhere) and the
candidate only in the infrared region. If the visible-region splice keeps most of the candidate's detail gain at a
small part of its fidelity loss, a detail term gated to that region is worth a run (docs/research/multi-sensor.md).

    python research/detail_probe.py --shards presets/multisensor/data/shards --set roadscene/val --set msrs/val \
        --reference default=presets/roadscene/models/model.safetensors \
        --candidate ft=presets/multisensor/models/model.safetensors
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.config import MAIN_METRICS
from cs2fusion.data.shards import iter_eval, set_files
from cs2fusion.inference.fuser import Fuser, FuseOptions
from cs2fusion.losses import local_std
from cs2fusion.metrics import _mi, grey_like_reference
from cs2fusion.validation import COMPOSITE, baseline_scores, image_scores, mean_scores, selection_score

log = logging.getLogger("detail_probe")


def visible_region(ir: np.ndarray, vi: np.ndarray, window: int) -> np.ndarray:
    """True where the visible image's local contrast exceeds the infrared's."""
    def sigma(x: np.ndarray) -> np.ndarray:
        return local_std(torch.from_numpy(x.astype(np.float64))[None, None], window)[0, 0].numpy()
    return sigma(vi) > sigma(ir)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--set", action="append", required=True, dest="sets")
    p.add_argument("--reference", required=True, help="NAME=CHECKPOINT")
    p.add_argument("--candidate", required=True, help="NAME=CHECKPOINT")
    p.add_argument("--window", type=int, default=9)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (ref_name, ref_path), (cand_name, cand_path) = (m.split("=", 1) for m in (args.reference, args.candidate))
    ref, cand = (Fuser(load_checkpoint(path).backbone, options=FuseOptions(winograd=False))
                 for path in (ref_path, cand_path))
    lines = ["| set | output | " + " | ".join(MAIN_METRICS) + " | MI(F,ir) | MI(F,vis) | composite |",
             "|---|---|" + "---|" * (len(MAIN_METRICS) + 3)]
    for name in args.sets:
        pairs = [(ir, vi) for _, ir, vi in iter_eval(set_files(args.shards, name))]
        base = baseline_scores(pairs)
        rows: dict[str, list[dict[str, float]]] = {}
        share = []
        for ir, vi in pairs:
            a, b = grey_like_reference(ir), grey_like_reference(vi)
            f_ref, f_cand = ref.fuse(vis=vi, ir=ir), cand.fuse(vis=vi, ir=ir)
            mask = visible_region(a, b, args.window)
            share.append(mask.mean())
            mask = mask[..., None] if f_ref.ndim == 3 else mask  # a colour output splices all three channels
            outputs = {ref_name: f_ref, cand_name: f_cand,
                       f"{cand_name} in vis region": np.where(mask, f_cand, f_ref),
                       f"{cand_name} in ir region": np.where(mask, f_ref, f_cand)}
            for label, f in outputs.items():
                g = grey_like_reference(f)
                rows.setdefault(label, []).append(
                    {**image_scores(f, ir, vi), "MI_ir": _mi(g, a), "MI_vis": _mi(g, b)})
        log.info("%s: %d pairs, visible region %.1f %% of pixels", name, len(pairs), 100 * np.mean(share))
        for label, scores in rows.items():
            s = mean_scores(scores)
            cells = " | ".join(f"{s[m]:.4g}" for m in (*MAIN_METRICS, "MI_ir", "MI_vis"))
            lines.append(f"| {name} | {label} | {cells} | {selection_score(s, base, COMPOSITE):.4f} |")
    print("\n".join(lines))  # noqa: T201 - the table is this script's output


if __name__ == "__main__":
    main()
