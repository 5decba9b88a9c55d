"""How much each backbone loss term steers training: the norm of its gradient on the backbone's parameters, on one
batch of 16 random 96² training crops (the short runs' first batch), from a random start and from the published nets.

With ``train.intensity: mse`` and λ 1 the intensity terms' gradient is ~7·10⁴ times the SSIM terms' (issue 17; why
``train.ssim_weight`` exists). Run: python research/loss_scales.py [--intensity mse|norm]   (seconds)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from cs2fusion.config import ImpairParams, ModelParams
from cs2fusion.losses import backbone_loss

from short_runs import REPO, SPLITS, _ids, _pairs, batches, start_nets

log = logging.getLogger("loss_scales")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--intensity", choices=("mse", "norm", "l1"), default="mse")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pairs = _pairs(args.shared / "data" / "roadscene", _ids(SPLITS / "train168.txt")[:40])
    ir, vis, _ = next(batches(pairs, epoch=0, patches=1, size=96, batch=16, impair_params=ImpairParams(), seed=0))
    published = args.shared / "reference" / "cs2fusion-published"
    for start in ("random", "published"):
        net, cpn = start_nets(start, ModelParams(map_norm="robust"), published, 0)
        out = net(vis_y=vis, ir=ir)
        m = cpn(ir=out.ir, vis=out.vis)
        lb = backbone_loss(out.fused, ir=ir, vis_y=vis, w_ir=m.w_ir, w_vis=m.w_vis,
                           scale=net.params.input_scale, intensity=args.intensity)
        params = list(net.parameters())
        norms = {}
        for name, term in (("intensity", lb["intensity_ir"] + lb["intensity_vis"]),
                           ("ssim", lb["ssim_ir"] + lb["ssim_vis"])):
            grads = torch.autograd.grad(term, params, retain_graph=True)
            norms[name] = float(torch.sqrt(sum(g.square().sum() for g in grads)))
        log.info("%s start: terms %s; gradient norm intensity %.4g, SSIM %.4g, ratio %.3g", start,
                 {k: round(float(v), 3) for k, v in lb.items()}, norms["intensity"], norms["ssim"],
                 norms["intensity"] / norms["ssim"])


if __name__ == "__main__":
    main()
