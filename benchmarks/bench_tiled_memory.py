"""Peak memory of exact tiled fusion (issue 5): a 3840×2160 pair, fused in a fresh process, peak RSS.

Run: python -m benchmarks.bench_tiled_memory [--tile 512]   (target: peak RSS ≤ 2 GB)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CHILD = """
import sys, time, resource, numpy as np, torch
from benchmarks.common import published_backbone
from cs2fusion.fusion import FuseOptions, Fuser
torch.set_num_threads(2)
tile = int(sys.argv[1])
rng = np.random.default_rng(0)
h, w = 2160, 3840
y = rng.uniform(0, 255, (h, w)).astype(np.float32)
ir = rng.uniform(0, 255, (h, w)).astype(np.float32)
fuser = Fuser(published_backbone(), options=FuseOptions(tile=tile, max_pixels=0))
t = time.perf_counter()
out = fuser.fuse_y(vis_y=y, ir=ir)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out.shape)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tile", type=int, default=512)
    args = p.parse_args()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(args.tile)], capture_output=True, text=True, check=True)
    seconds, rss_mb, *_ = proc.stdout.split()
    print(f"3840x2160 tiled fusion, tile {args.tile}: {float(seconds):.1f} s, peak RSS {float(rss_mb):.0f} MB "
          f"(target <= 2048 MB); process total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
