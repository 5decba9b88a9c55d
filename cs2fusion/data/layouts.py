"""The native folder layouts of public IVIF data sets, and their auto-detection.

Each layout lists (native split, infrared folder, visible folder) triples relative to the data set root; a
native split of ``None`` means the layout carries no split of its own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from cs2fusion.data.pairs import Pair, match_pairs
from cs2fusion.io import InputError


@dataclasses.dataclass(frozen=True)
class Layout:
    """A data set layout: name, and (native split, ir folder, vi folder) candidates."""

    name: str
    folders: tuple[tuple[str | None, str, str], ...]
    description: str

    def present(self, root: Path) -> list[tuple[str | None, Path, Path]]:
        """The candidate folder pairs that exist under ``root`` (both sides present)."""
        return [
            (split, root / ir, root / vi)
            for split, ir, vi in self.folders
            if _is_dir_exact(root, ir) and _is_dir_exact(root, vi)
        ]


def _is_dir_exact(root: Path, rel: str) -> bool:
    """Is ``root/rel`` a folder, with exactly that spelling (M3FD's ``Ir`` is not ``ir`` on any file system)?"""
    path = root
    for part in Path(rel).parts:
        if not path.is_dir() or part not in {p.name for p in path.iterdir()}:
            return False
        path = path / part
    return path.is_dir()


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("ir-vi", ((None, "ir", "vi"),), "ir/ + vi/ (this project's layout, TNO-style sets)"),
        Layout("roadscene", ((None, "cropinfrared", "crop_LR_visible"),),
               "RoadScene: cropinfrared/ + crop_LR_visible/"),
        Layout("msrs", (("train", "train/ir", "train/vi"), ("test", "test/ir", "test/vi")),
               "MSRS: {train,test}/{ir,vi}"),
        Layout(
            "llvip",
            (("train", "infrared/train", "visible/train"), ("test", "infrared/test", "visible/test")),
            "LLVIP: {infrared,visible}/{train,test}",
        ),
        Layout("m3fd", ((None, "Ir", "Vis"),), "M3FD: Ir/ + Vis/"),
    )
}


def detect_layout(root: str | Path) -> Layout:
    """The one layout present under ``root``; none or several raise, naming the root."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data set root is not a folder")
    found = [layout for layout in LAYOUTS.values() if layout.present(root)]
    if not found:
        known = "; ".join(layout.description for layout in LAYOUTS.values())
        raise InputError(f"{root}: no known layout found (known: {known})")
    if len(found) > 1:
        names = ", ".join(layout.name for layout in found)
        raise InputError(f"{root}: ambiguous layout ({names}); set layout explicitly in params.yaml")
    return found[0]


def discover(root: str | Path, layout: str = "auto") -> tuple[list[tuple[str | None, Pair]], list[str]]:
    """Every pair under ``root`` with its native split (named or auto-detected layout), and unpaired files."""
    root = Path(root)
    if layout == "auto":
        chosen = detect_layout(root)
    elif layout in LAYOUTS:
        chosen = LAYOUTS[layout]
    else:
        raise InputError(f"{root}: unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}")
    present = chosen.present(root)
    if not present:
        raise InputError(f"{root}: does not have the {chosen.name} layout ({chosen.description})")
    out: list[tuple[str | None, Pair]] = []
    problems: list[str] = []
    for split, ir_dir, vi_dir in present:
        pairs, unpaired = match_pairs(ir_dir, vi_dir)
        out.extend((split, pair) for pair in pairs)
        problems.extend(unpaired)
    return out, problems
