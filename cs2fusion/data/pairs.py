"""Registered infrared/visible pairs: matched by id (file stem) across two folders, and validated."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from cs2fusion.io import IMAGE_SUFFIXES, InputError, read_grey, read_image


@dataclasses.dataclass(frozen=True)
class Pair:
    """One registered pair: an id and the two image files."""

    id: str
    ir: Path
    vi: Path


def list_images(folder: str | Path) -> dict[str, Path]:
    """id (file stem) → image path for the images directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_symlink() and not path.exists() and path.suffix.lower() in IMAGE_SUFFIXES:
            raise InputError(f"{path}: broken symbolic link (its target {path.readlink()} does not exist)")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in found:
                raise InputError(f"{path}: id {path.stem!r} also names {found[path.stem].name}")
            found[path.stem] = path
    if not found:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def natural_key(text: str) -> tuple:
    """Sort key that orders "2" before "10"."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t)


def unread_files(folder: str | Path) -> list[Path]:
    """Files directly inside ``folder`` that :func:`list_images` passes over (not an image type it reads)."""
    return [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
            and not p.name.startswith(".")]


def match_pairs(ir_dir: str | Path, vi_dir: str | Path) -> tuple[list[Pair], list[str]]:
    """Pairs matched by id in natural id order, and one message per image without its partner (naming a file of
    that id that is not a type read, where there is one)."""
    irs, vis = list_images(ir_dir), list_images(vi_dir)
    unread = {folder: {p.stem: p for p in unread_files(folder)} for folder in (Path(ir_dir), Path(vi_dir))}

    def why(i: str, folder: Path) -> str:
        other = unread[folder].get(i)
        return f"; {other} is not an image type read ({', '.join(IMAGE_SUFFIXES)})" if other else ""

    problems = [
        f"{ids[i]}: no {kind} partner (id {i!r}{why(i, folder)})"
        for ids, other, kind, folder in ((irs, vis, "visible", Path(vi_dir)), (vis, irs, "infrared", Path(ir_dir)))
        for i in sorted(set(ids) - set(other), key=natural_key)
    ]
    pairs = [Pair(i, irs[i], vis[i]) for i in sorted(set(irs) & set(vis), key=natural_key)]
    return pairs, problems


def find_pairs(ir_dir: str | Path, vi_dir: str | Path) -> list[Pair]:
    """Pairs matched by id, in natural id order; an image without its partner raises, naming it."""
    pairs, problems = match_pairs(ir_dir, vi_dir)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(problems[0] + more)
    return pairs


def load_pair(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(ir grey uint8 (H, W), visible uint8 (H, W) or (H, W, 3)), checked to be the same size."""
    ir = read_grey(pair.ir)
    vi = read_image(pair.vi)
    if ir.shape[:2] != vi.shape[:2]:
        raise InputError(
            f"{pair.vi}: size {vi.shape[1]}x{vi.shape[0]} does not match {pair.ir} ({ir.shape[1]}x{ir.shape[0]})"
        )
    return ir, vi
