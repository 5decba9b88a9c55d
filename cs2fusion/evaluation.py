"""Evaluation of fused images: per-image metrics per method, trivial baselines, summaries and comparisons.

Every image is converted to grey as the reference evaluator does (:func:`grey_like_reference`). The trivial
baselines are the golden file's: ``mean`` = floor((ir + vi)/2 + 0.5) and ``max`` = max(ir, vi), on grey.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from cs2fusion.data.shards import iter_eval
from cs2fusion.io import InputError, read_image
from cs2fusion.metrics import ALL_METRICS, MAIN_METRICS, all_metrics, grey_like_reference

BASELINES = {
    "mean": lambda ir, vi: np.floor((ir + vi) / 2 + 0.5),
    "max": lambda ir, vi: np.maximum(ir, vi),
}


def evaluate_set(name: str, files: list[str], fused: dict[str, Path]) -> list[dict[str, Any]]:
    """Rows (set, method, id, metrics…) for every pair of one evaluation set, methods + trivial baselines."""
    rows = []
    for meta, ir_img, vi_img in tqdm(iter_eval(files), desc=f"evaluating {name}", unit="pair", disable=None):
        ir, vi = grey_like_reference(ir_img), grey_like_reference(vi_img)
        candidates = {m: folder / f"{meta['id']}.png" for m, folder in fused.items()}
        for method, path in candidates.items():
            if not path.is_file():
                raise InputError(f"{path}: missing fused image for {name}/{meta['id']}")
            f = grey_like_reference(read_image(path))
            rows.append({"set": name, "method": method, "id": meta["id"], **all_metrics(f, ir, vi)})
        for method, fn in BASELINES.items():
            rows.append({"set": name, "method": method, "id": meta["id"], **all_metrics(fn(ir, vi), ir, vi)})
    return rows


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {method: {metric: mean over images, "n": count}}}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["set"], row["method"]), []).append(row)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, method), items in sorted(groups.items()):
        means = {m: float(np.mean([r[m] for r in items])) for m in ALL_METRICS}
        out.setdefault(name, {})[method] = {**means, "n": len(items)}
    return out


def wins(challenger: dict[str, float], reference: dict[str, float], metrics: Iterable[str] = MAIN_METRICS) -> list[str]:
    """The metrics (higher is better) on which ``challenger`` beats ``reference``."""
    return [m for m in metrics if challenger[m] > reference[m]]


def comparison_table(summary: dict[str, dict[str, dict[str, float]]], metrics: Iterable[str] = ALL_METRICS) -> str:
    """A Markdown table per set: methods × metrics (means), best of each main metric in bold."""
    metrics = list(metrics)
    lines = []
    for name, methods in summary.items():
        n = next(iter(methods.values()))["n"]
        lines += [f"**{name}** ({n} pairs)", "", "| method | " + " | ".join(metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        best = {m: max(v[m] for v in methods.values()) for m in metrics if m in MAIN_METRICS}
        for method, values in methods.items():
            cells = [f"**{values[m]:.4g}**" if best.get(m) == values[m] else f"{values[m]:.4g}" for m in metrics]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
