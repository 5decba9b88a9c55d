"""One call for one pair: :func:`fuse_pair` takes arrays or image files and returns the fused image, reusing one
:class:`Fuser` per (model, device, options) in the process."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.data.pairs import Pair, load_pair
from cs2fusion.inference.fuser import FuseOptions, Fuser, resolve_device
from cs2fusion.io import InputError
from cs2fusion.pretrained import DEFAULT_MODEL

@functools.lru_cache(maxsize=4)
def open_fuser(model: str | Path = DEFAULT_MODEL, *, device: str = "auto",
               options: FuseOptions = FuseOptions()) -> Fuser:
    """The fuser of checkpoint ``model`` (cached: a second call with the same arguments costs nothing)."""
    return Fuser(load_checkpoint(model).backbone, device=resolve_device(device), options=options)


def _as_image(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise InputError(f"{name}: expected uint8 pixels, got {x.dtype}")
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] == 3)):
        raise InputError(f"{name}: expected (H, W) or (H, W, 3), got shape {x.shape}")
    return x


def fuse_pair(ir: np.ndarray | str | Path, vi: np.ndarray | str | Path, *, model: str | Path = DEFAULT_MODEL,
              device: str = "auto", precision: str = "fp32", tile: int = 512,
              max_pixels: int = 4_000_000) -> np.ndarray:
    """Fuses one registered pair: ``ir`` uint8 (H, W), ``vi`` uint8 (H, W) or (H, W, 3), or their image files →
    fused uint8 image, colour when ``vi`` is colour (the same as ``cs2fusion fuse``)."""
    if isinstance(ir, (str, Path)) or isinstance(vi, (str, Path)):
        if not (isinstance(ir, (str, Path)) and isinstance(vi, (str, Path))):
            raise InputError("give ir and vi both as arrays or both as image files")
        ir, vi = load_pair(Pair(Path(vi).stem, Path(ir), Path(vi)))
    ir, vi = _as_image(ir, "ir"), _as_image(vi, "vi")
    if ir.ndim == 3:
        raise InputError(f"ir: expected a grey (H, W) image, got shape {ir.shape}")
    if ir.shape != vi.shape[:2]:
        raise InputError(f"ir {ir.shape} and vi {vi.shape[:2]} differ in size")
    options = FuseOptions(precision=precision, tile=tile, max_pixels=max_pixels)
    return open_fuser(str(model), device=device, options=options).fuse(vis=vi, ir=ir)
