"""Time of the full metric set on one 640×480 triple (issue 5).  Run: python -m benchmarks.bench_metrics"""

from __future__ import annotations

import numpy as np

from benchmarks.common import best_of, report
from cs2fusion.metrics import ALL_METRICS, all_metrics


def main() -> None:
    rng = np.random.default_rng(0)
    f, a, b = (rng.integers(0, 256, (480, 640)).astype(np.float64) for _ in range(3))
    t = best_of(lambda: all_metrics(f, a, b), repeats=5)
    report("metrics on 640x480", [{"metrics": len(ALL_METRICS), "seconds (full set)": t}])


if __name__ == "__main__":
    main()
