"""Colour conversion, BT.601 full range (JPEG/JFIF YCbCr, no studio-swing offsets), on float 0–255 arrays.

CS2Fusion fuses luminance only: the network gets Y of the visible image and the output takes the visible
image's Cb/Cr back. The +128 chroma offsets cancel between the two directions, so they are left out.
"""

from __future__ import annotations

import numpy as np


def rgb_to_ycbcr_bt601_full(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W, 3) RGB 0–255 → Y, Cb, Cr as float32 (H, W); Cb/Cr centred on 0."""
    rgb = np.asarray(rgb, dtype=np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = np.float32(0.299) * r + np.float32(0.587) * g + np.float32(0.114) * b
    cb = np.float32(-0.168736) * r + np.float32(-0.331264) * g + np.float32(0.5) * b
    cr = np.float32(0.5) * r + np.float32(-0.418688) * g + np.float32(-0.081312) * b
    return y, cb, cr


def ycbcr_to_rgb_bt601_full(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    """Y, Cb, Cr float (H, W) → RGB float32 (H, W, 3), not clipped."""
    y, cb, cr = (np.asarray(a, dtype=np.float32) for a in (y, cb, cr))
    r = y + np.float32(1.402) * cr
    g = y - np.float32(0.344136) * cb - np.float32(0.714136) * cr
    b = y + np.float32(1.772) * cb
    return np.stack([r, g, b], axis=-1)


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """Luminance Y = 0.299 R + 0.587 G + 0.114 B as float32 (H, W)."""
    return rgb_to_ycbcr_bt601_full(rgb)[0]


def luminance(vis: np.ndarray) -> np.ndarray:
    """Y of a visible image, grey (H, W) or RGB (H, W, 3) 0–255, as float32 (H, W): what the network's first branch
    takes."""
    return rgb_to_grey(vis) if vis.ndim == 3 else np.asarray(vis, dtype=np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Clip to 0–255 and truncate, as the CS2Fusion release does when it writes its outputs."""
    return np.clip(x, 0.0, 255.0).astype(np.uint8)
