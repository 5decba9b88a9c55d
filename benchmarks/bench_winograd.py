"""The head convs alone: oneDNN's direct conv vs the compiled Winograd F(4×4, 3×3) kernel (issue 7).

The head, the decoder's first conv (128→64) and the three query convs (64→112 on both branches), is 80 % of the
network's 0.508 MFLOP per pixel. Both sides fill preallocated outputs; reports times, the direct-conv GFLOP/s
(effective for Winograd) and each side's largest error against fp64 convs.
Run: python -m benchmarks.bench_winograd [--band-cols N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import DATA, best_of, published_backbone, report
from cs2fusion.color import rgb_to_grey
from cs2fusion.inference import kernels
from cs2fusion.inference.convs import Conv3x3
from cs2fusion.inference.heads import DirectHead, WinogradHead
from cs2fusion.io import read_image

CL = torch.channels_last


def direct_head(head: DirectHead):
    """The fast path's direct head: its own in-place convs (oneDNN where available) into preallocated outputs."""
    wq = torch.cat([w for w, _ in head.queries]).contiguous(memory_format=CL)  # ungated: levels 0, 1, 2
    bq = torch.cat([b for _, b in head.queries])

    def run(feats, d1, q2, qsum):
        head.conv(d1, feats[0:1], head.dec1[0], head.dec1_bias, act=False)
        head.conv(d1, feats[1:2], head.dec1[1], None, accumulate=True)
        head.conv(q2, feats, wq, bq)
        return d1, torch.add(q2[0:1], q2[1:2], out=qsum)

    return run


def reference_head(backbone, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d1 and the query sum in fp64, straight from the model's convs."""
    act = lambda t: F.leaky_relu(t, backbone.params.negative_slope)  # noqa: E731
    f = feats.double()
    dec, queries = backbone.decoder[0], [d.query for d in backbone.ddm]
    d1 = act(F.conv2d(f.reshape(1, -1, *f.shape[2:]), dec.weight.double(), dec.bias.double(), padding=1))
    wq, bq = torch.cat([q.weight for q in queries]).double(), torch.cat([q.bias for q in queries]).double()
    q = act(F.conv2d(f, wq, bq, padding=1))
    return d1, q[0:1] + q[1:2]


def max_err(outs: tuple[torch.Tensor, ...], refs: tuple[torch.Tensor, ...]) -> float:
    """Largest |Δ| over (d1, query sum) pairs, both as (1, C, H, W)."""
    return max((o.double() - r).abs().max().item() for o, r in zip(outs, refs))


def compare(backbone, direct, wino: WinogradHead, label: str, feats: torch.Tensor) -> list[dict]:
    """Both heads on one image's features: time, direct-conv GFLOP/s, error vs fp64."""
    h, w = feats.shape[2:]
    convs = [backbone.decoder[0], *(d.query for d in backbone.ddm)]
    macs = convs[0].in_channels * convs[0].out_channels + 2 * sum(k.in_channels * k.out_channels for k in convs[1:])
    flop = 2 * 9 * h * w * macs  # the queries run on both branches
    new = lambda n, k: torch.empty(n, k, h, w).contiguous(memory_format=CL)  # noqa: E731
    with torch.inference_mode():
        ref = reference_head(backbone, feats)
        fl = feats.contiguous(memory_format=CL)
        d1, q2, qs = new(1, 64), new(2, 112), new(1, 112)
        t_direct = best_of(lambda: direct(fl, d1, q2, qs))
        err_direct = max_err(direct(fl, d1, q2, qs), ref)
        wd1, wq = new(1, 64), [new(1, k) for k in wino.query_channels]
        t_wino = best_of(lambda: wino(fl, wd1, wq))
        err_wino = max_err((wd1, torch.cat(wq, 1)), ref)
    return [{"image": label, "path": path, "ms": 1e3 * t, "GFLOP/s": flop / t / 1e9, "vs direct": t_direct / t,
             "max |err| vs fp64": err}
            for path, t, err in (("oneDNN direct", t_direct, err_direct), ("Winograd kernel", t_wino, err_wino))]


def features(backbone, vis_y: np.ndarray, ir: np.ndarray) -> torch.Tensor:
    """Both encoders' outputs (2, 64, H, W) on the published weights' 0–255 scale."""
    with torch.inference_mode():
        v, i = (torch.from_numpy(a)[None, None] for a in (vis_y, ir))
        return torch.cat([backbone.encoder_vis(v).stacked(), backbone.encoder_ir(i).stacked()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--band-cols", type=int, default=32, help="4×4 tiles per band (one tile row high)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernel = kernels.winograd_head()
    if kernel is None:
        raise SystemExit("the Winograd kernel could not be built (see the warning above)")
    backbone = published_backbone()
    folder = DATA / "cs2fusion_roadscene40"
    rng = np.random.default_rng(0)
    cases = {
        "roadscene #17 (320x592)": (rgb_to_grey(read_image(folder / "vi" / "17.png")),
                                    read_image(folder / "ir" / "17.png").astype(np.float32)),
        "640x480 synthetic": tuple(rng.uniform(0, 255, (480, 640)).astype(np.float32) for _ in range(2)),
    }
    conv = Conv3x3(torch.device("cpu"), torch.float32, backbone.params.negative_slope)
    direct = direct_head(DirectHead(backbone, conv, torch.float32))
    wino = WinogradHead(backbone, kernel, band_cols=args.band_cols)
    rows = []
    for label, (vis_y, ir) in cases.items():
        rows += compare(backbone, direct, wino, label, features(backbone, vis_y, ir))
    report(f"head convs (dec1 + queries), {args.threads} threads, bands of {args.band_cols} tiles; GFLOP/s counts "
           f"direct-conv FLOPs", rows, args.json)


if __name__ == "__main__":
    main()
