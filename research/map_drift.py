"""Where the compensation map drifts under training: the CPN's map and the fused image's source correlations, probed
every epoch of short runs that differ in one setting each (issue 17: why the full recipe copies a source).

Same data and batches as ``short_runs.py`` (random 96² crops of the 168 training pairs, seeded alike, batch 16),
``roles`` order and random start unless the variant says otherwise, ``norm_scope: batch``. The probe: 8 fixed 128²
crops of the held-out pairs; ``map_mean`` is the mean of the map on the CPN's first slot (the weight of that source's
intensity term), ``map_high`` its share of pixels above 0.9 (:func:`cs2fusion.training.map_stats`; the published
weights: 0.48 and 0.14 on the same crops).

``--validate`` adds, after the last epoch, the nine main metrics of the backbone on the 12 held-out pairs (whole
images) and the composite selection score (:mod:`cs2fusion.validation`; pixel-mean fusion = 1, published 1.304).

``--start CHECKPOINT`` starts every variant from a checkpoint's nets (e.g. a state of the full recipe) and
``--lr-scale`` multiplies both learning rates (0.1: the schedule's rates after its first drop).

Run: python research/map_drift.py --out /tmp/map_drift.jsonl [--variants NAME,…] [--epochs N] [--validate]
[--start CKPT.safetensors] [--lr-scale S] [--save DIR] [--seed N]
(~1 min per epoch per variant on 2 cores, ~0.5 min more to validate)
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from cs2fusion.checkpoint import save_checkpoint
from cs2fusion.color import luminance
from cs2fusion.config import ImpairParams, ModelParams, TrainParams, build
from cs2fusion.training import build_state, map_stats, train_step
from cs2fusion.validation import baseline_scores

from short_runs import SPLITS, REPO, _ids, _pairs, batches, score_backbone, start_nets

log = logging.getLogger("map_drift")
PHASE1 = str(REPO / "presets" / "roadscene" / "models" / "phase1.safetensors")  # dvc pull
# TrainParams overrides, plus ``start`` (random | pretrain | published | a checkpoint .safetensors) and ``map_norm``
# (ModelParams); an lr of 1e-12 freezes that net
# the sharp map with l1 terms and SSIM λ 150: phase 4's and phase 5's base
SHARP_L1 = {"map_norm": "robust_sharp", "intensity": "l1", "ssim_weight": 150.0}
VARIANTS = {
    "paper": {},
    "no impaired term (k 0)": {"impaired_weight": 0.0},
    "CPN lr ×0.1": {"lr_cpn": 2e-5},
    "backbone lr ×0.1": {"lr_backbone": 2e-4},
    "CPN frozen": {"lr_cpn": 1e-12},
    "backbone frozen": {"lr_backbone": 1e-12},
    "literal from the published nets": {"step_order": "literal", "start": "published"},
    "intensity mse": {"intensity": "mse"},
    "intensity mse + CPN lr ×0.1": {"intensity": "mse", "lr_cpn": 2e-5},
    "robust map": {"map_norm": "robust"},
    "robust map + mse": {"map_norm": "robust", "intensity": "mse"},
    "robust map + mse; literal": {"map_norm": "robust", "intensity": "mse", "step_order": "literal"},
    # the SSIM terms' gradient is ~7·10⁴ times smaller than the mse terms' at λ 1 (random and published nets)
    "robust map + mse + SSIM ×3e3": {"map_norm": "robust", "intensity": "mse", "ssim_weight": 3e3},
    "robust map + mse + SSIM ×1e4": {"map_norm": "robust", "intensity": "mse", "ssim_weight": 1e4},
    "robust map + mse + SSIM ×3e4": {"map_norm": "robust", "intensity": "mse", "ssim_weight": 3e4},
    "robust map + mse + SSIM ×1e5": {"map_norm": "robust", "intensity": "mse", "ssim_weight": 1e5},
    "robust map + mse + SSIM ×1e6": {"map_norm": "robust", "intensity": "mse", "ssim_weight": 1e6},
    # the map's range: mean ± 2 std (robust) holds a two-level map at 0.25–0.75, ± 1 std (robust_tight) lets it span 0–1
    "tight map + mse + SSIM ×1e4": {"map_norm": "robust_tight", "intensity": "mse", "ssim_weight": 1e4},
    "tight map + mse + SSIM ×3e3": {"map_norm": "robust_tight", "intensity": "mse", "ssim_weight": 3e3},
    "tight map + mse + SSIM ×3e4": {"map_norm": "robust_tight", "intensity": "mse", "ssim_weight": 3e4},
    # l1: unsquared per pixel, least at the more weighted source (a selection); its gradient is ~200× smaller than
    # mse's beside the SSIM terms' (scripts/loss_scales.py), so λ 50 keeps about the preset's balance at the start
    "tight map + l1 + SSIM ×15": {"map_norm": "robust_tight", "intensity": "l1", "ssim_weight": 15.0},
    "tight map + l1 + SSIM ×50": {"map_norm": "robust_tight", "intensity": "l1", "ssim_weight": 50.0},
    "tight map + l1 + SSIM ×150": {"map_norm": "robust_tight", "intensity": "l1", "ssim_weight": 150.0},
    "tight map + l1 + SSIM ×500": {"map_norm": "robust_tight", "intensity": "l1", "ssim_weight": 500.0},
    # under l1 the pull towards one source grows with |2m − 1|: a map clamped at mean ± 0.5 std selects harder
    "sharp map + l1 + SSIM ×150": SHARP_L1,
    # the field's max-intensity prior beside the map's terms (not the paper's): a pull toward the brighter source
    "tight map + l1 + SSIM ×150 + max ×0.5": {"map_norm": "robust_tight", "intensity": "l1", "ssim_weight": 150.0,
                                             "max_weight": 0.5},
    "tight map + l1 + SSIM ×150 + max ×1": {"map_norm": "robust_tight", "intensity": "l1", "ssim_weight": 150.0,
                                           "max_weight": 1.0},
    "sharp map + l1 + SSIM ×150 + max ×0.5": {**SHARP_L1, "max_weight": 0.5},
    # plus the field's max-gradient term (not the paper's): the max term's pull to the brighter source without its loss
    # of edges
    "sharp map + l1 + SSIM ×150 + max ×0.5 + grad ×1": {**SHARP_L1, "max_weight": 0.5, "grad_weight": 1.0},
    "sharp map + l1 + SSIM ×150 + max ×1 + grad ×1": {**SHARP_L1, "max_weight": 1.0, "grad_weight": 1.0},
    "sharp map + l1 + SSIM ×150 + max ×1 + grad ×3": {**SHARP_L1, "max_weight": 1.0, "grad_weight": 3.0},
    "sharp map + l1 + SSIM ×150 + max ×1": {**SHARP_L1, "max_weight": 1.0},
    "sharp map + l1 + SSIM ×150 + max ×1 + grad ×0.3": {**SHARP_L1, "max_weight": 1.0, "grad_weight": 0.3},
    "sharp map + l1 + SSIM ×150 + max ×2 + grad ×1": {**SHARP_L1, "max_weight": 2.0, "grad_weight": 1.0},
    "sharp map + l1 + SSIM ×150 + max ×1.5 + grad ×0.3": {**SHARP_L1, "max_weight": 1.5, "grad_weight": 0.3},
    "sharp map + l1 + SSIM ×150 + max ×1.5 + grad ×0.5": {**SHARP_L1, "max_weight": 1.5, "grad_weight": 0.5},
    # from the full recipe's epoch-6 state (phase 1 of presets/roadscene) at its learning rates then (×0.1)
    "phase 1 epoch 6, robust": {"map_norm": "robust", "intensity": "mse", "ssim_weight": 1e4, "start": PHASE1,
                                "lr_backbone": 2e-4, "lr_cpn": 2e-5},
    "phase 1 epoch 6, tight": {"map_norm": "robust_tight", "intensity": "mse", "ssim_weight": 1e4, "start": PHASE1,
                               "lr_backbone": 2e-4, "lr_cpn": 2e-5},
    "phase 1 epoch 6, tight, lr ×10": {"map_norm": "robust_tight", "intensity": "mse", "ssim_weight": 1e4,
                                       "start": PHASE1},
}
NET_KEYS = ("start", "map_norm")


def probe_crops(pairs: list[tuple[np.ndarray, np.ndarray]], size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-left ``size``² crop of the first 8 pairs as (ir, vis Y), (8, 1, size, size) in [0, 1]."""
    ir = np.stack([p[0][:size, :size] for p in pairs[:8]]).astype(np.float32) / 255
    vi = np.stack([luminance(p[1])[:size, :size] for p in pairs[:8]]) / 255
    return torch.from_numpy(ir)[:, None], torch.from_numpy(vi)[:, None]


def probe(state, train: TrainParams, ir: torch.Tensor, vi: torch.Tensor) -> dict[str, float]:
    """The CPN's map statistics and the fused image's correlation with each source on the probe crops."""
    with torch.no_grad():
        fused = state.backbone(vis_y=vi, ir=ir).fused.flatten().numpy()

    def corr(x: torch.Tensor) -> float:
        return round(float(np.corrcoef(fused, x.flatten().numpy())[0, 1]), 3)

    stats = map_stats(state.backbone, state.cpn, ir=ir, vis_y=vi, step_order=train.step_order)
    return {**{k: round(v, 3) for k, v in stats.items()}, "corr_ir": corr(ir), "corr_vis": corr(vi)}


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace(";", "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--out", type=Path, required=True, help="results, one JSON line per variant (appended)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--patches", type=int, default=2, help="random crops per training pair per epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--validate", action="store_true", help="score the last epoch's backbone on the held-out pairs")
    p.add_argument("--pictures", type=Path, default=None, help="with --validate: a grid of 3 validation pairs per run")
    p.add_argument("--start", default=None, help="a checkpoint .safetensors every variant starts from")
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiplies both learning rates of every variant")
    p.add_argument("--save", type=Path, default=None, help="folder for each run's last nets (<variant>.safetensors)")
    p.add_argument("--seed", type=int, default=None, help="overrides train.seed (batch order, crops, cut-outs)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data, published = args.shared / "data" / "roadscene", args.shared / "reference" / "cs2fusion-published"
    train_pairs = _pairs(data, _ids(SPLITS / "train168.txt"))
    val_pairs = _pairs(data, _ids(SPLITS / "val12.txt"))
    ir, vi = probe_crops(val_pairs)
    base = baseline_scores(val_pairs) if args.validate else {}
    for name in args.variants.split(","):
        override = dict(VARIANTS[name])
        if args.start:
            override["start"] = args.start
        if args.seed is not None:
            override["seed"] = args.seed
        if args.lr_scale != 1.0:
            defaults = TrainParams()
            override["lr_backbone"] = override.get("lr_backbone", defaults.lr_backbone) * args.lr_scale
            override["lr_cpn"] = override.get("lr_cpn", defaults.lr_cpn) * args.lr_scale
        model = build(ModelParams, {"norm_scope": "batch", "map_norm": override.get("map_norm", "minmax")})
        train = build(TrainParams, {"step_order": "roles", "fast_losses": True,  # the flat layout of the time
                                    **{k: v for k, v in override.items() if k not in NET_KEYS}})
        backbone, cpn = start_nets(override.get("start", "random"), model, published, train.seed)
        state = build_state(model, train, backbone=backbone, cpn=cpn)
        trace, t0 = [{"step": 0, **probe(state, train, ir, vi)}], time.perf_counter()
        for epoch in range(args.epochs):
            for batch in batches(train_pairs, epoch=epoch, patches=args.patches, size=96, batch=train.batch_size,
                                 impair_params=ImpairParams(), seed=train.seed):
                train_step(state, batch, train)
            trace.append({"step": state.step, **probe(state, train, ir, vi)})
            log.info("%s: %s", name, trace[-1])
        record = {"variant": name, "override": override, "wall_s": round(time.perf_counter() - t0), "trace": trace}
        if args.validate:
            picture = args.pictures / f"{_slug(name)}.png" if args.pictures else None
            record["validation"] = score_backbone(state.backbone, val_pairs, base, picture)
            log.info("%s validation: %s", name, {k: round(v, 3) for k, v in record["validation"].items()})
        if args.save:
            record["saved"] = str(args.save / f"{_slug(name)}.safetensors")
            save_checkpoint(record["saved"], state.backbone, state.cpn, source=f"map_drift: {name}", step=state.step)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
