"""Shared benchmark helpers: timing, the published weights, the real data location, result output."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CS2FUSION_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
PUBLISHED = SHARED / "reference" / "cs2fusion-published"


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def published_backbone():
    from cs2fusion.model import Backbone
    from cs2fusion.model.weights import load_published_backbone

    backbone = Backbone()
    load_published_backbone(backbone, PUBLISHED / "backbone.pt")
    return backbone.eval()


def report(name: str, rows: list[dict], out: Path | None = None) -> None:
    """Prints rows as an aligned table; writes JSON if ``out`` is given."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(_fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print(f"\n== {name}")
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k, "")).ljust(widths[k]) for k in keys))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2))


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
