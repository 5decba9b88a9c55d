"""Inference speed (issue 7): the straightforward path vs the fast path (fp32, bf16), same process, same images.

Straightforward = the model's own forward: eager PyTorch, NCHW, fp32, 0–1 inputs scaled inside. Reports fused
megapixels per second on the 40 RoadScene test pairs and a 640×480 synthetic pair, the speed-up, achieved
GFLOP/s and a matrix-product peak measured in this run. GFLOP/s counts the direct convs' FLOPs, so with the
Winograd head (4× fewer products there) it is an effective rate and can exceed the peak; "fast fp32 direct" and
"fast bf16 direct" are the fast paths with direct convs in the head.  Run: python -m benchmarks.bench_inference

``--no-mmap`` first tells glibc never to hand large blocks back to the kernel (process-wide), which shows how
much of the straightforward path's time is page-faulting fresh memory (the fast path reuses one buffer).
"""

from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATA, best_of, published_backbone, report
from cs2fusion.color import rgb_to_grey
from cs2fusion.inference import FuseOptions, Fuser
from cs2fusion.io import read_image


def flops_per_pixel(backbone) -> float:
    """Multiply-adds ×2 of every 3×3 conv per pixel (the DDM gates are per image, negligible)."""
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    gates = {id(d.gate) for d in backbone.ddm}
    queries = {id(d.query) for d in backbone.ddm}
    total = 0.0
    for c in convs:
        if id(c) in gates:
            continue
        macs = c.in_channels * c.out_channels * 9
        total += 2 * macs * (2 if id(c) in queries else 1)  # each query conv runs on both branches
    return total


def matmul_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = best_of(lambda: a @ b, repeats=5)
    return 2 * n**3 / t / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=40, help="how many of the 40 RoadScene pairs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-mmap", action="store_true", help="glibc: no mmap, no trimming (allocator comparison)")
    args = p.parse_args()
    if args.no_mmap:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: serve every block from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD (a C int): keep up to 2 GiB of freed heap memory
    torch.set_num_threads(args.threads)
    backbone = published_backbone()
    folder = DATA / "cs2fusion_roadscene40"
    pairs = []
    for k in range(1, args.pairs + 1):
        pairs.append((rgb_to_grey(read_image(folder / "vi" / f"{k}.png")),
                      read_image(folder / "ir" / f"{k}.png").astype(np.float32)))
    rng = np.random.default_rng(0)
    synthetic = [tuple(rng.uniform(0, 255, (480, 640)).astype(np.float32) for _ in range(2))]
    paths = {
        "straightforward fp32": FuseOptions(fast=False),
        "fast fp32": FuseOptions(),
        "fast fp32 direct": FuseOptions(winograd=False),
        "fast bf16": FuseOptions(precision="bf16"),
        "fast bf16 direct": FuseOptions(precision="bf16", winograd=False),
    }
    fpp = flops_per_pixel(backbone)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    rows, base = [], {}
    for images, label in ((pairs, "roadscene40"), (synthetic, "640x480 synthetic")):
        mpix = sum(y.size for y, _ in images) / 1e6
        for name, options in paths.items():
            fuser = Fuser(backbone, options=options)
            t = best_of(lambda: [fuser.fuse_y(vis_y=y, ir=i) for y, i in images], repeats=1 if len(images) > 1 else 3)
            base.setdefault(label, t)
            rows.append({"images": label, "path": name, "seconds": t, "Mpx/s": mpix / t,
                         "speedup": base[label] / t, "eff. GFLOP/s": fpp * mpix * 1e6 / t / 1e9})
    allocator = ", glibc no-mmap" if args.no_mmap else ""
    report(f"inference, {args.threads} threads{allocator}; {fpp / 1e6:.3f} MFLOP per pixel (pair); matmul peak "
           f"fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s", rows, args.json)


if __name__ == "__main__":
    main()
