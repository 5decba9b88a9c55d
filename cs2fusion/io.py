"""Image reading with one clear error per bad file, and atomic writes (temp name, then rename).

Input policy (documented in the README):
- accepted: 8-bit grey (L) and 8-bit colour (RGB); palette images (P) without transparency are expanded;
- an infrared image given as RGB becomes grey (BT.601 luminance; most data sets store IR as 3 equal channels);
- refused: images with alpha (LA, RGBA, PA), 16/32-bit and float images (I;16, I, F: the radiometric window is
  the user's choice, so we do not guess one), bilevel, CMYK and other modes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image

from cs2fusion.color import rgb_to_grey

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_MARKER = ".cs2fusion-output"  # names the stage that wrote a folder; only such a folder is ever replaced


class InputError(ValueError):
    """Bad user input (image, folder or pairing); the message names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """An 8-bit image as uint8, (H, W) for grey or (H, W, 3) for colour; anything else raises InputError."""
    return decode_image(Path(path), str(path))


def decode_image(source: Path | BinaryIO, name: str) -> np.ndarray:
    """:func:`read_image` of a file or of an open binary stream (an upload), errors naming it ``name``."""
    path = name
    try:
        with Image.open(source) as img:
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
    if array.ndim == 3 and all(np.array_equal(array[..., 0], array[..., c]) for c in (1, 2)):
        array = np.ascontiguousarray(array[..., 0])
    return array


def read_grey(path: str | Path) -> np.ndarray:
    """An 8-bit image as grey uint8 (H, W); colour becomes BT.601 luminance rounded to the nearest level."""
    return as_grey(read_image(path))


def as_grey(array: np.ndarray) -> np.ndarray:
    """A uint8 image as grey (H, W): colour becomes BT.601 luminance rounded to the nearest level."""
    if array.ndim == 3:
        array = np.clip(np.round(rgb_to_grey(array)), 0, 255).astype(np.uint8)
    return array


def pixels_sha256(array: np.ndarray) -> str:
    """Hex sha256 of decoded pixels (shape, dtype and values): equal for re-encoded copies of one image."""
    digest = hashlib.sha256(f"{array.shape}{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def safe_name(name: str, where: str) -> str:
    """``name`` if it can be a file name inside an output folder (no separators, not ``.``/``..``, not empty)."""
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise InputError(f"{where}: unsafe id {name!r} (an id becomes a file name: no '/', '\\', '..' or NUL)")
    return name


def is_url(location: str | Path) -> bool:
    """True for ``scheme://…`` locations other than ``file://`` (which are plain paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def refuse_aliasing(out: str | Path, *sources: str | Path, may_hold_sources: bool = False, flag: str = "--out") -> None:
    """Outputs never equal or land inside an input, nor (unless ``may_hold_sources``: an output that is written
    file by file, never replaced as a whole) contain one. Paths resolved, symlinks followed."""
    target = Path(out).resolve()
    for src in sources:
        if is_url(src):  # an object-store URL is never a local output
            continue
        s = Path(src).resolve()
        inside = s.is_dir() and target.is_relative_to(s)
        if target == s or inside or (not may_hold_sources and s.is_relative_to(target)):
            raise InputError(f"{out}: the output would overwrite the input {src}; choose another {flag}")


def check_writable_folder(folder: str | Path) -> None:
    """Fails early, in one line, where ``folder`` cannot become or be written as an output folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: not writable")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; outputs get the modes plain open/mkdir would give (umask honoured)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


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
        _chmod_default(tmp_path, directory=False)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, owner: str, inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yields a temporary folder beside ``path``; it replaces ``path`` as a whole only if the block succeeds.

    Only an empty folder or an earlier output of the same ``owner`` (its marker file) is ever replaced, and never
    one that is, holds or lies inside one of ``inputs``: anything else is refused before any work.
    """
    path = Path(path)
    refuse_aliasing(path, *inputs)
    check_writable_folder(path)
    if path.is_dir() and any(path.iterdir()):
        marker = path / OUTPUT_MARKER
        if not (marker.is_file() and marker.read_text().strip() == owner):
            raise InputError(f"{path}: not empty and not an earlier output of the {owner} stage; refusing to "
                             "replace it (choose another --out, or empty it yourself)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(owner + "\n")
        for folder in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
            _chmod_default(folder, directory=True)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 (H, W) or (H, W, 3) array as PNG, atomically."""
    if array.dtype != np.uint8:
        raise InputError(f"{path}: expected uint8 pixels, got {array.dtype}")
    with _naming(path), atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_text(path: str | Path, text: str) -> None:
    """Writes a text file atomically."""
    with _naming(path), atomic_path(path) as tmp:
        tmp.write_text(text)


def os_error_line(err: OSError) -> str:
    """``<file>: <reason>`` for a failed read or write (read-only, no space, not a folder…)."""
    names = [str(n) for n in (err.filename, err.filename2) if n]
    return f"{' -> '.join(names) or 'I/O'}: {err.strerror or err}"


@contextlib.contextmanager
def _naming(path: str | Path) -> Iterator[None]:
    """A failed write (no space, file too large, read-only) names the file the user asked for."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None
