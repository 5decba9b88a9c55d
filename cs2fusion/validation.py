"""Validation during training: the main metrics of the current backbone on whole validation images, and the
selection score that picks the best checkpoint.

The score ``composite`` is the mean over the nine main metrics of (model / pixel-mean fusion) on the same images:
every main metric is higher-is-better, the ratio makes them scale-free, and the baseline is fixed per validation
set, so scores of different epochs compare. ``select`` may also name one metric (e.g. ``Qabf``). Those metrics
reward an output that copies one source (a copy of the infrared image scored composite 1.416, the published weights
1.304): a checkpoint whose output correlates with either source at :data:`COPY_CORR` or more scores 0, whatever
``select`` is.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from cs2fusion.evaluation import BASELINES
from cs2fusion.inference import Fuser
from cs2fusion.metrics import MAIN_METRICS, all_metrics, grey_like_reference

COMPOSITE = "composite"
COPY_CORR = 0.95  # mean correlation with one source at which the "fusion" is a copy of it (published: 0.48 / 0.65)
SELECTABLE = (COMPOSITE, *MAIN_METRICS)
SELECT_GAP, SELECT_NEAR = 30.0, 8.0  # grey levels: where the sources clearly differ; "at" a source


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def selection_stats(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray, *, gap: float = SELECT_GAP,
                    near: float = SELECT_NEAR) -> dict[str, float]:
    """Does a fusion select a source per pixel or blend them? On the pixels where the grey sources differ by more
    than ``gap`` grey levels: the shares within ``near`` of the brighter source and of the darker one, and strictly
    between them (20–80 % of the way), NaN where no pixel differs that much; plus the mean |F − max(IR, vis)| over
    the image (float grey arrays, one shape; the published weights: ~0.95 near the brighter source, ~3 grey levels
    from the maximum)."""
    hi, lo = np.maximum(ir, vi), np.minimum(ir, vi)
    clear = (hi - lo) > gap
    where = (fused - lo) / np.maximum(hi - lo, 1e-6)
    masks = {"near_brighter": np.abs(fused - hi) < near, "near_darker": np.abs(fused - lo) < near,
             "between": (where > 0.2) & (where < 0.8)}
    shares = {k: float(m[clear].mean()) if clear.any() else float("nan") for k, m in masks.items()}
    return {**shares, "dist_max": float(np.abs(fused - hi).mean())}


def image_scores(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> dict[str, float]:
    """Main metrics of one fused image (grey as the reference evaluator), plus its correlation with each source
    (``corr_ir`` / ``corr_vis``: a fusion that copies one source shows here first) and :func:`selection_stats`."""
    f, a, b = (grey_like_reference(x) for x in (fused, ir, vi))
    scores = {k: v for k, v in all_metrics(f, a, b).items() if k in MAIN_METRICS}
    return {**scores, "corr_ir": _corr(f, a), "corr_vis": _corr(f, b), **selection_stats(f, a, b)}


def mean_scores(rows: Iterable[dict[str, float]]) -> dict[str, float]:
    """Per-key means of per-image score dicts."""
    rows = list(rows)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def validate(fuser: Fuser, pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[dict[str, float], list[np.ndarray]]:
    """Mean scores of ``fuser`` over (ir uint8, vi uint8 grey or RGB) pairs, and the fused images (for a grid)."""
    fused = [fuser.fuse(vis=vi, ir=ir) for ir, vi in pairs]
    return mean_scores(image_scores(f, ir, vi) for f, (ir, vi) in zip(fused, pairs)), fused


def baseline_scores(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean scores of the pixel-mean fusion (the composite's reference) over the same pairs."""
    rows = []
    for ir, vi in pairs:
        a, b = grey_like_reference(ir), grey_like_reference(vi)
        rows.append(image_scores(BASELINES["mean"](a, b), a, b))
    return mean_scores(rows)


def copies_a_source(scores: dict[str, float]) -> bool:
    """Whether the output is (nearly) one source: mean correlation with it at least :data:`COPY_CORR`."""
    return max(scores["corr_ir"], scores["corr_vis"]) >= COPY_CORR


def selection_score(scores: dict[str, float], baseline: dict[str, float], select: str) -> float:
    """Higher is better: one main metric, or ``composite`` = mean over the main metrics of scores / baseline; 0 for an
    output that copies a source."""
    if copies_a_source(scores):
        return 0.0
    if select == COMPOSITE:
        return float(np.mean([scores[m] / baseline[m] for m in MAIN_METRICS]))
    return float(scores[select])
