"""Winograd F(4×4, 3×3) in PyTorch ops vs oneDNN's direct conv, on the inference graph's head (issue 7 study).

The head, the decoder's first conv (128→64) and the three query convs (64→112 on both branches), is 80 % of the
network's 0.508 MFLOP per pixel, and all of it reads only the encoder features. Winograd needs 4× fewer
multiplications there: transform each 6×6 input block once (Bᵀ d B), one (tiles × 64) @ (64 × 176) product per
of the 36 positions and branch, transform back (Aᵀ m A) (Lavin & Gray, 2016). Written with library calls, the
transforms are separate passes over memory, so bands of tiles that stay in cache run on single-threaded workers,
one per core (two-thread library calls on a band keep moving it between the cores, measured 1.5–2× slower).
Both sides fill preallocated outputs. Reports times, per-step time and the error against fp64.
Run: python -m benchmarks.bench_winograd
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import DATA, best_of, published_backbone, report
from cs2fusion.color import rgb_to_grey
from cs2fusion.fusion import InferenceGraph
from cs2fusion.io import read_image

CL = torch.channels_last
BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
      [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
STEPS = ("gather", "input transform", "products", "output transform", "bias+act+sum", "scatter")


def tile_grid(h: int, w: int) -> tuple[int, int]:
    """Number of 4×4 output tiles down and across an h×w image."""
    return -(-h // 4), -(-w // 4)


def kron(m: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t).float()


def transform_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) → (36, C_in, C_out): G g Gᵀ per channel pair, computed in fp64."""
    g = torch.tensor(G, dtype=torch.float64)
    u = torch.einsum("ai,ocij,bj->aboc", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).transpose(1, 2).float().contiguous()


class Head:
    """d1 = act(dec1([F_vis, F_ir])) and the query sum act(q(F_vis)) + act(q(F_ir)) of all three levels."""

    def __init__(self, backbone, band: tuple[int, int]) -> None:
        w1 = backbone.decoder[0].weight
        queries = torch.cat([d.query.weight for d in backbone.ddm])
        half = w1.shape[1] // 2
        uq = transform_weights(queries)
        per_branch = [torch.cat([transform_weights(w), uq], 2) for w in (w1[:, :half], w1[:, half:])]
        self.u = torch.stack(per_branch, 1).flatten(0, 1)  # (72, 64, 176): position-major, then branch
        self.b1 = backbone.decoder[0].bias.detach()
        self.bq = torch.cat([d.query.bias.detach() for d in backbone.ddm])
        self.slope = backbone.params.negative_slope
        self.kb, self.ka, self.band = kron(BT), kron(AT), band
        self.threads = torch.get_num_threads()
        self.pool = ThreadPoolExecutor(self.threads)
        self.steps = np.zeros(len(STEPS))

    def __call__(self, padded: torch.Tensor, d1: torch.Tensor, qsum: torch.Tensor) -> None:
        """padded (2, 4·th+2, 4·tw+2, 64) zero-bordered features; d1 (H, W, 64), qsum (H, W, 112) outputs."""
        th, tw = tile_grid(*d1.shape[:2])
        rows, cols = self.band
        todo = [(r, min(rows, th - r), c, min(cols, tw - c)) for r in range(0, th, rows) for c in range(0, tw, cols)]
        jobs = [self.pool.submit(self._worker, padded, d1, qsum, todo[k :: self.threads]) for k in range(self.threads)]
        for j in jobs:
            j.result()

    def _worker(self, padded, d1, qsum, todo) -> None:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for band in todo:
                    self._band(padded, d1, qsum, *band)
        finally:
            torch.set_num_threads(self.threads)

    def _band(self, padded, d1, qsum, r0, rows, c0, cols) -> None:
        t = [time.perf_counter()]
        s, n, c = padded.stride(), padded.shape[0], padded.shape[3]
        blocks = padded.as_strided((6, 6, n, rows, cols, c), (s[1], s[2], s[0], 4 * s[1], 4 * s[2], 1),
                                   4 * r0 * s[1] + 4 * c0 * s[2]).contiguous()
        t.append(time.perf_counter())
        v = self.kb @ blocks.view(36, -1)
        t.append(time.perf_counter())
        tiles = rows * cols
        m = torch.bmm(v.view(72, tiles, c), self.u)
        t.append(time.perf_counter())
        y = (self.ka @ m.view(36, -1)).view(16, 2, tiles, -1)
        t.append(time.perf_counter())
        c1 = self.b1.shape[0]
        dec = F.leaky_relu_(y[:, 0, :, :c1] + y[:, 1, :, :c1] + self.b1, self.slope)
        q = F.leaky_relu_(y[:, :, :, c1:] + self.bq, self.slope)
        q = q[:, 0] + q[:, 1]
        t.append(time.perf_counter())
        for blk, out in ((dec, d1), (q, qsum)):
            hh, ww = min(4 * rows, out.shape[0] - 4 * r0), min(4 * cols, out.shape[1] - 4 * c0)
            src = blk.view(4, 4, rows, cols, -1).permute(2, 0, 3, 1, 4).reshape(4 * rows, 4 * cols, -1)
            out[4 * r0 : 4 * r0 + hh, 4 * c0 : 4 * c0 + ww] = src[:hh, :ww]
        t.append(time.perf_counter())
        self.steps += np.diff(t)


def direct_head(graph: InferenceGraph):
    """The fast path's way: its own in-place convs (oneDNN where available) into preallocated outputs."""
    wq = torch.cat([w for w, _ in graph.queries]).contiguous(memory_format=CL)  # ungated: levels 0, 1, 2
    bq = torch.cat([b for _, b in graph.queries])

    def run(feats, d1, q2, qsum):
        graph._conv(d1, feats[0:1], graph.dec1[0], graph.dec1_bias, act=False)
        graph._conv(d1, feats[1:2], graph.dec1[1], None, accumulate=True)
        graph._conv(q2, feats, wq, bq)
        return d1, torch.add(q2[0:1], q2[1:2], out=qsum)

    return run


def reference_head(backbone, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d1 and the query sum in fp64, straight from the model's convs."""
    act = lambda t: F.leaky_relu(t, backbone.params.negative_slope)
    f = feats.double()
    dec, queries = backbone.decoder[0], [d.query for d in backbone.ddm]
    d1 = act(F.conv2d(f.reshape(1, -1, *f.shape[2:]), dec.weight.double(), dec.bias.double(), padding=1))
    wq, bq = torch.cat([q.weight for q in queries]).double(), torch.cat([q.bias for q in queries]).double()
    q = act(F.conv2d(f, wq, bq, padding=1))
    return d1, q[0:1] + q[1:2]


def max_err(outs: tuple[torch.Tensor, ...], refs: tuple[torch.Tensor, ...]) -> float:
    """Largest |Δ| over (d1, query sum) pairs, both as (1, C, H, W)."""
    return max((o.double() - r).abs().max().item() for o, r in zip(outs, refs))


def compare(backbone, direct, wino: Head, label: str, feats: torch.Tensor) -> list[dict]:
    """Both heads on one image's features: time, direct-conv GFLOP/s, error vs fp64, Winograd step times."""
    _, c, h, w = feats.shape
    convs = [backbone.decoder[0], *(d.query for d in backbone.ddm)]
    macs = convs[0].in_channels * convs[0].out_channels + 2 * sum(k.in_channels * k.out_channels for k in convs[1:])
    flop = 2 * 9 * h * w * macs  # the queries run on both branches
    with torch.inference_mode():
        ref = reference_head(backbone, feats)
        fl = feats.contiguous(memory_format=CL)
        d1, q2, qs = (torch.empty(n, k, h, w).contiguous(memory_format=CL) for n, k in ((1, 64), (2, 112), (1, 112)))
        t_direct = best_of(lambda: direct(fl, d1, q2, qs))
        err_direct = max_err(direct(fl, d1, q2, qs), ref)
        th, tw = tile_grid(h, w)
        padded = torch.zeros(2, 4 * th + 2, 4 * tw + 2, c)
        padded[:, 1 : h + 1, 1 : w + 1] = feats.permute(0, 2, 3, 1)
        wd1, wq = torch.empty(h, w, 64), torch.empty(h, w, 112)
        wino.steps[:] = 0
        t_wino = best_of(lambda: wino(padded, wd1, wq), repeats=3)
        steps = wino.steps / 4 / torch.get_num_threads()  # mean over best_of's 4 calls, per worker
        err_wino = max_err((wd1.permute(2, 0, 1)[None], wq.permute(2, 0, 1)[None]), ref)
    return [
        {"image": label, "path": "oneDNN direct", "ms": 1e3 * t_direct, "GFLOP/s": flop / t_direct / 1e9,
         "vs direct": 1.0, "max |err| vs fp64": err_direct},
        {"image": label, "path": "Winograd F(4,3)", "ms": 1e3 * t_wino, "GFLOP/s": flop / t_wino / 1e9,
         "vs direct": t_direct / t_wino, "max |err| vs fp64": err_wino,
         **{f"{k} ms": 1e3 * v for k, v in zip(STEPS, steps)}},
    ]


def features(backbone, vis_y: np.ndarray, ir: np.ndarray) -> torch.Tensor:
    """Both encoders' outputs (2, 64, H, W) on the published weights' 0–255 scale."""
    with torch.inference_mode():
        v, i = (torch.from_numpy(a)[None, None] for a in (vis_y, ir))
        return torch.cat([backbone.encoder_vis(v).stacked(), backbone.encoder_ir(i).stacked()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--band", type=int, nargs=2, default=(4, 10), help="tile rows and columns per band")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backbone = published_backbone()
    folder = DATA / "cs2fusion_roadscene40"
    rng = np.random.default_rng(0)
    cases = {
        "roadscene #17 (320x592)": (rgb_to_grey(read_image(folder / "vi" / "17.png")),
                                    read_image(folder / "ir" / "17.png").astype(np.float32)),
        "640x480 synthetic": tuple(rng.uniform(0, 255, (480, 640)).astype(np.float32) for _ in range(2)),
    }
    direct = direct_head(InferenceGraph(backbone))
    wino = Head(backbone, tuple(args.band))
    rows = []
    for label, (vis_y, ir) in cases.items():
        rows += compare(backbone, direct, wino, label, features(backbone, vis_y, ir))
    report(f"head convs (dec1 + queries), {args.threads} threads, band {args.band[0]}x{args.band[1]} tiles; "
           f"GFLOP/s counts direct-conv FLOPs; step times: mean per call and worker", rows, args.json)


if __name__ == "__main__":
    main()
