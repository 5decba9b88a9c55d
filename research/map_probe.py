"""What a trained CPN's compensation map looks like: its spread and what it follows, on the 8 probe crops of
``research/map_drift.py`` (128² crops of held-out RoadScene pairs), for checkpoints with a CPN and the published nets.

Per model: the map's mean, standard deviation and shares above 0.9 / below 0.1 (of the CPN's first slot, as
:func:`cs2fusion.training.map_stats` reads it), the kurtosis of the estimator's output before normalisation (1 for two
levels, 3 for a Gaussian), the correlation of the infrared weight with the infrared image, the visible image and their
difference, and where the CPN's features carry their energy (the infrared weight there, energy-weighted).
``--pictures`` writes one row of crops per model: infrared | visible | infrared weight.

Run: python research/map_probe.py published presets/roadscene/state/roadscene/checkpoint_*/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.config import ModelParams
from cs2fusion.io import write_png
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.model.weights import load_published_backbone, load_published_cpn
from cs2fusion.training import cpn_slots

from map_drift import probe_crops
from short_runs import REPO, SPLITS, _ids, _pairs

log = logging.getLogger("map_probe")


def nets(which: str, published: Path) -> tuple[Backbone, CompensationPerceptionNetwork, str]:
    """(backbone, CPN, step order) of a checkpoint, or of the release (``published``: trained in the literal order)."""
    if which == "published":
        model = ModelParams(norm_scope="batch")
        backbone, cpn = Backbone(model), CompensationPerceptionNetwork(model)
        load_published_backbone(backbone, published / "backbone.pt")
        load_published_cpn(cpn, published / "cpn.pt")
        return backbone, cpn, "literal"
    ck = load_checkpoint(which, with_cpn=True)
    return ck.backbone, ck.cpn, ck.meta.get("step_order", "roles")


def map_profile(backbone: Backbone, cpn: CompensationPerceptionNetwork, order: str, ir: torch.Tensor,
                vis: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
    """The statistics above and the infrared weight map (N, 1, H, W)."""
    with torch.no_grad():
        slot1, slot2 = cpn_slots(backbone(vis_y=vis, ir=ir), order)
        out = cpn(ir=slot1, vis=slot2)
        h = (out.map_ir + out.map_vis).reshape(len(ir), -1, *ir.shape[2:])  # w_ir·h + (1 − w_ir)·h
        raw = cpn.estimator(h)
    w = out.w_ir
    w_ir = w if order == "roles" else 1 - w
    z = (raw - raw.mean()) / raw.std()
    energy = h.square().sum(dim=1, keepdim=True)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]), 3)

    stats = {"map_mean": float(w.mean()), "map_std": float(w.std()), "above_0.9": float((w > 0.9).float().mean()),
             "below_0.1": float((w < 0.1).float().mean()), "kurtosis": float(z.pow(4).mean()),
             "ir_weight_corr_ir": corr(w_ir, ir), "ir_weight_corr_vis": corr(w_ir, vis),
             "ir_weight_corr_ir_minus_vis": corr(w_ir, ir - vis),
             "ir_weight_where_features_are": float((w_ir * energy).sum() / energy.sum())}
    return {k: round(v, 4) for k, v in stats.items()}, w_ir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="'published' or checkpoints (.safetensors) holding a CPN")
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--pictures", type=Path, default=None, help="folder for one picture per model")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ir, vis = probe_crops(_pairs(args.shared / "data" / "roadscene", _ids(SPLITS / "val12.txt")))
    for which in args.models:
        stats, w_ir = map_profile(*nets(which, args.shared / "reference" / "cs2fusion-published"), ir, vis)
        log.info("%s", json.dumps({"model": which, **stats}))
        if args.pictures:
            rows = [np.concatenate(list(t[:, 0].numpy()), axis=1) for t in (ir, vis, w_ir)]
            name = "published" if which == "published" else Path(which).parent.name
            args.pictures.mkdir(parents=True, exist_ok=True)
            write_png(args.pictures / f"map_{name}.png", (np.concatenate(rows) * 255).round().astype(np.uint8))


if __name__ == "__main__":
    main()
