"""The "visually impaired" visible view (paper §3.3): random rectangles of the visible image cut out.

The CPN's second pass sees the visible image with regions removed, an extra positive that teaches it where
the infrared image has to compensate. The release shipped precomputed impaired images without their recipe;
ours cuts ``regions`` rectangles whose sides are uniform fractions of the image sides, filled with ``fill``.
"""

from __future__ import annotations

import numpy as np

from cs2fusion.config import ImpairParams


def impair(image: np.ndarray, rng: np.random.Generator, params: ImpairParams) -> np.ndarray:
    """A copy of ``image`` (H, W[, C]) with ``params.regions`` random rectangles set to ``params.fill``.

    ``fill`` is given on the [0, 1] scale and multiplied by 255 for uint8 images.
    """
    if not 0 < params.min_frac <= params.max_frac <= 1:
        raise ValueError(f"impair fractions must satisfy 0 < min_frac <= max_frac <= 1, got {params}")
    out = image.copy()
    h, w = image.shape[:2]
    fill = params.fill * 255 if image.dtype == np.uint8 else params.fill
    for _ in range(params.regions):
        rh = max(1, int(round(h * rng.uniform(params.min_frac, params.max_frac))))
        rw = max(1, int(round(w * rng.uniform(params.min_frac, params.max_frac))))
        top = int(rng.integers(0, h - rh + 1))
        left = int(rng.integers(0, w - rw + 1))
        out[top : top + rh, left : left + rw] = fill
    return out
