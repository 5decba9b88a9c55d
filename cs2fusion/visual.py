"""Side-by-side image grids (IR | visible | fused …) for reports and MLflow artifacts."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _rgb(image: np.ndarray, height: int) -> np.ndarray:
    img = Image.fromarray(image).convert("RGB")
    width = max(1, round(img.width * height / img.height))
    return np.asarray(img.resize((width, height), Image.BILINEAR))


def _label(text: str, width: int, height: int = 14) -> np.ndarray:
    """A white strip ``width`` wide with ``text`` in black (Pillow's built-in font), cut to fit."""
    strip = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(strip).text((2, 1), text[: max(1, width // 6)], fill="black", font=ImageFont.load_default())
    return np.asarray(strip)


def grid(rows: list[list[np.ndarray]], *, height: int = 160, pad: int = 4, labels: list[str] | None = None
         ) -> np.ndarray:
    """uint8 images (grey or RGB, any sizes) → one RGB uint8 grid; each row's cells scaled to ``height``;
    ``labels``: a header naming the columns (their widths from the first row)."""
    if not rows:
        raise ValueError("grid needs at least one row")
    lines = []
    if labels:
        cells = [_label(text, _rgb(c, height).shape[1]) for text, c in zip(labels, rows[0])]
        spacer = np.full((cells[0].shape[0], pad, 3), 255, np.uint8)
        lines.append(np.concatenate([x for c in cells for x in (c, spacer)][:-1], axis=1))
    for row in rows:
        cells = [_rgb(c, height) for c in row]
        spacer = np.full((height, pad, 3), 255, np.uint8)
        line = np.concatenate([x for c in cells for x in (c, spacer)][:-1], axis=1)
        lines.append(line)
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, pad), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)[:-pad]
