"""Image reading with one clear error per bad file, and atomic writes (temp name, then rename).

Input policy (documented in the README):
- accepted: 8-bit grey (L) and 8-bit colour (RGB); palette images (P) without transparency are expanded;
- an infrared image given as RGB becomes grey (BT.601 luminance; most data sets store IR as 3 equal channels);
- refused: images with alpha (LA, RGBA, PA), 16/32-bit and float images (I;16, I, F: the radiometric window is
  the user's choice, so we do not guess one), bilevel, CMYK and other modes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from cs2fusion.color import rgb_to_grey

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class InputError(ValueError):
    """Bad user input (image, folder or pairing); the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """An 8-bit image as uint8, (H, W) for grey or (H, W, 3) for colour; anything else raises InputError."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode == "P" and "transparency" not in img.info:
                img = img.convert("RGB")
                mode = "RGB"
            if mode in ("LA", "RGBA", "PA", "P"):
                raise InputError(f"{path}: has an alpha channel (mode {mode}); save it as grey or RGB")
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                raise InputError(
                    f"{path}: {mode} images (16/32-bit or float) are not accepted; convert to 8-bit with the "
                    "radiometric window of your choice"
                )
            if mode not in ("L", "RGB"):
                raise InputError(f"{path}: unsupported image mode {mode}; use 8-bit grey (L) or RGB")
            array = np.asarray(img)
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: corrupt or truncated image ({err})") from None
    if array.ndim == 3 and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2]):
        array = np.ascontiguousarray(array[..., 0])
    return array


def read_grey(path: str | Path) -> np.ndarray:
    """An 8-bit image as grey uint8 (H, W); colour becomes BT.601 luminance rounded to the nearest level."""
    array = read_image(path)
    if array.ndim == 3:
        array = np.clip(np.round(rgb_to_grey(array)), 0, 255).astype(np.uint8)
    return array


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; it replaces ``path`` as a whole only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    if array.dtype != np.uint8:
        raise InputError(f"{path}: expected uint8 pixels, got {array.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_text(path: str | Path, text: str) -> None:
    """Writes a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
