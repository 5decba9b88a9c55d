"""A deterministic, built-in demo data set of registered infrared/visible pairs.

It looks like the task (warm targets that are hard to see in the visible image, textured visible scenes with
dark regions, a smooth thermal background with sensor noise) so the whole pipeline can run anywhere in
minutes. It is a demo only: never use it for quality claims.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from cs2fusion.config import SynthParams
from cs2fusion.io import write_png


def _blur(x: np.ndarray, radius: int) -> np.ndarray:
    """Three box blurs (≈ Gaussian) along both axes, edges replicated."""
    for axis in (0, 1):
        for _ in range(3):
            pad = [(0, 0)] * x.ndim
            pad[axis] = (radius + 1, radius)
            c = np.cumsum(np.pad(x, pad, mode="edge"), axis=axis)
            x = (np.take(c, range(2 * radius + 1, c.shape[axis]), axis=axis)
                 - np.take(c, range(0, c.shape[axis] - 2 * radius - 1), axis=axis)) / (2 * radius + 1)
    return x


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def synth_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One registered pair: (ir uint8 (H, W), visible RGB uint8 (H, W, 3))."""
    h, w = height, width
    yy = np.linspace(0, 1, h)[:, None] * np.ones((1, w))
    horizon = rng.uniform(0.3, 0.5)
    ground = yy > horizon
    # Visible: sky gradient, textured ground, buildings with windows, a road with markings.
    texture = _blur(rng.normal(0, 1, (h, w)), 1) * 25 + _blur(rng.normal(0, 1, (h, w)), 4) * 40
    lum = np.where(ground, 90 + texture, 170 - 60 * yy + 0.2 * texture)
    ir = np.where(ground, 110.0 + 0.3 * texture, 60.0) + _blur(rng.normal(0, 1, (h, w)), 12) * 120
    for _ in range(rng.integers(2, 5)):
        bx, bw = rng.uniform(0, w), rng.uniform(0.1, 0.25) * w
        top = horizon * h - rng.uniform(0.1, 0.3) * h
        box = (np.arange(w)[None, :] >= bx) & (np.arange(w)[None, :] < bx + bw) & (np.arange(h)[:, None] >= top)
        box &= np.arange(h)[:, None] < horizon * h + 2
        windows = ((np.arange(h)[:, None] // 4) % 2 == 0) & ((np.arange(w)[None, :] // 5) % 2 == 0)
        lum = np.where(box, 120 + 50 * windows, lum)
        ir = np.where(box, ir + 25, ir)
    road = ground & (np.abs(np.arange(w)[None, :] - w / 2) < (yy - horizon) * w * 0.8)
    marks = road & (np.abs(np.arange(w)[None, :] - w / 2) < 1.5) & ((np.arange(h)[:, None] // 6) % 2 == 0)
    lum = np.where(road, 70 + 0.3 * texture, lum)
    lum = np.where(marks, 220, lum)
    # Dark regions (night, shadow): the visible image loses detail there.
    dark = np.ones((h, w))
    for _ in range(rng.integers(1, 3)):
        region = _ellipse(h, w, rng.uniform(0.4, 1) * h, rng.uniform(0, w), rng.uniform(0.2, 0.5) * h,
                          rng.uniform(0.2, 0.4) * w)
        dark = np.minimum(dark, np.where(region, rng.uniform(0.1, 0.25), 1.0))
    dark = _blur(dark, 3)
    # Warm targets (people, cars): bright in IR, low contrast in the visible, often in the dark.
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(horizon + 0.1, 0.95) * h, rng.uniform(0.05, 0.95) * w
        ry, rx = rng.uniform(0.05, 0.12) * h, rng.uniform(0.02, 0.08) * w
        target = _ellipse(h, w, cy, cx, ry, rx)
        ir = np.where(target, rng.uniform(190, 240), ir)
        lum = np.where(target, lum + rng.uniform(-12, 12), lum)
    ir = np.clip(_blur(ir, 1) + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)
    lum = lum * dark + rng.normal(0, 2, (h, w))
    tint = np.stack([np.ones_like(lum), np.ones_like(lum), np.ones_like(lum)], axis=-1)
    tint[..., 2] += np.where(ground, -0.15, 0.2)[...] * 1.0
    tint[..., 1] += np.where(ground, 0.05, 0.05)
    vis = np.clip(lum[..., None] * tint, 0, 255).astype(np.uint8)
    return ir, vis


def write_demo(params: SynthParams) -> Path:
    """Writes ``params.pairs`` pairs as ``<out>/ir/<id>.png`` + ``<out>/vi/<id>.png``; returns ``out``."""
    out = Path(params.out)
    rng = np.random.default_rng(params.seed)
    for k in tqdm(range(1, params.pairs + 1), desc="synthesising", unit="pair", disable=None):
        ir, vis = synth_pair(rng, params.height, params.width)
        write_png(out / "ir" / f"demo{k:03d}.png", ir)
        write_png(out / "vi" / f"demo{k:03d}.png", vis)
    return out
