"""Peak memory of exact tiled fusion (issue 5) against whole-image fusion, each in a fresh process (peak RSS).

Rows: whole-image and tiled fusion of a 1920×1080 pair (the side-by-side ratio), and tiled fusion of a 3840×2160
pair (target: peak RSS ≤ 2 GB; whole-image fusion of that size needs several times more).
Run: python -m benchmarks.bench_tiled_memory [--tile 512]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from benchmarks.common import report

CHILD = """
import sys, time, resource, numpy as np, torch
from benchmarks.common import published_backbone
from cs2fusion.inference import FuseOptions, Fuser
torch.set_num_threads(2)
h, w, tile = (int(a) for a in sys.argv[1:4])
rng = np.random.default_rng(0)
y = rng.uniform(0, 255, (h, w)).astype(np.float32)
ir = rng.uniform(0, 255, (h, w)).astype(np.float32)
fuser = Fuser(published_backbone(), options=FuseOptions(tile=tile, max_pixels=0))  # tile 0: whole image
t = time.perf_counter()
out = fuser.fuse_y(vis_y=y, ir=ir)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def _run(h: int, w: int, tile: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(h), str(w), str(tile)], capture_output=True, text=True,
                          check=True)
    seconds, rss_mb = (float(v) for v in proc.stdout.split())
    return {"image": f"{w}x{h}", "mode": f"tiled {tile}" if tile else "whole image", "seconds": seconds,
            "peak RSS MB": rss_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tile", type=int, default=512)
    args = p.parse_args()
    rows = [_run(1080, 1920, 0), _run(1080, 1920, args.tile), _run(2160, 3840, args.tile)]
    ratio = rows[0]["peak RSS MB"] / rows[1]["peak RSS MB"]
    report(f"exact tiled fusion memory; 1920x1080: whole / tiled peak RSS = {ratio:.1f}x; "
           f"3840x2160 tiled: {rows[2]['peak RSS MB']:.0f} MB (target <= 2048 MB)", rows)


if __name__ == "__main__":
    main()
