"""The data manifest: every validated pair of every data set, with sizes, checksums and its split.

Validation decodes both images (so corrupt or truncated files are caught), checks that the pair has the same
size, and records the visible mode (L or RGB). ``strict`` raises listing every bad pair; ``skip`` drops them
and records why in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm import tqdm

from cs2fusion.config import DatasetSpec, PrepareParams, set_parts
from cs2fusion.data.layouts import discover
from cs2fusion.data.pairs import Pair, load_pair, natural_key
from cs2fusion.io import InputError, pixels_sha256

log = logging.getLogger(__name__)
MANIFEST_VERSION = 2  # 2: decoded-pixel hashes for the leak check


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_id_list(path: str | Path, known: Iterable[str]) -> list[str]:
    """Ids from a list file: per non-comment line, the first whitespace-separated token that is a known id."""
    known = set(known)
    ids: list[str] = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the id list ({getattr(err, 'strerror', None) or err})") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = next((tok for tok in re.split(r"[\s,;]+", line) if tok in known), None)
        if match is None:
            raise InputError(f"{path}:{number}: no id of the data set on this line: {line!r}")
        ids.append(match)
    return ids


def assign_splits(spec: DatasetSpec, pairs: list[tuple[str | None, Pair]]) -> dict[str, str]:
    """id → split name, by the precedence documented on :class:`DatasetSpec`."""
    ids = [pair.id for _, pair in pairs]
    if spec.lists:
        split = {i: "unused" for i in ids}
        for name, list_file in spec.lists.items():
            for i in read_id_list(list_file, ids):
                if split[i] != "unused":
                    raise InputError(f"{list_file}: id {i!r} is already in split {split[i]!r}")
                split[i] = name
        return split
    if spec.ratio:
        total = sum(spec.ratio.values())
        if total <= 0 or any(v < 0 for v in spec.ratio.values()):
            raise InputError(f"dataset {spec.name}: ratio must be non-negative with a positive sum")
        order = np.random.default_rng(spec.seed).permutation(len(ids))
        bounds = np.round(np.cumsum([v / total for v in spec.ratio.values()]) * len(ids)).astype(int)
        names = np.searchsorted(bounds, np.arange(len(ids)), side="right")
        return {ids[j]: list(spec.ratio)[names[k]] for k, j in enumerate(order)}
    return {pair.id: native or spec.default_split for native, pair in pairs}


def _entry(pair: Pair, split: str) -> dict[str, Any]:
    ir, vi = load_pair(pair)
    return {
        "id": pair.id,
        "split": split,
        "ir": str(pair.ir),
        "vi": str(pair.vi),
        "height": int(ir.shape[0]),
        "width": int(ir.shape[1]),
        "vi_mode": "RGB" if vi.ndim == 3 else "L",
        "ir_sha256": sha256_file(pair.ir),
        "vi_sha256": sha256_file(pair.vi),
        "ir_pixels_sha256": pixels_sha256(ir),  # the leak check's key: re-encoding does not change it
        "vi_pixels_sha256": pixels_sha256(vi),
    }


def prepare_dataset(spec: DatasetSpec, policy: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Validated manifest entries of one data set, and the problems found (bad pairs, unpaired files)."""
    pairs, problems = discover(spec.root, spec.layout)
    seen: dict[str, Pair] = {}
    for _, pair in pairs:
        if pair.id in seen:
            problems.append(f"{pair.ir}: id {pair.id!r} appears twice in {spec.name} (also {seen[pair.id].ir})")
        seen[pair.id] = pair
    splits = assign_splits(spec, pairs)
    entries = []
    for _, pair in tqdm(pairs, desc=f"validating {spec.name}", unit="pair", disable=None):
        try:
            entries.append(_entry(pair, splits[pair.id]))
        except InputError as err:
            problems.append(str(err))
    if problems and policy == "strict":
        listing = "\n  ".join(problems)
        raise InputError(f"{spec.name}: {len(problems)} bad pair(s) (policy strict):\n  {listing}")
    for problem in problems:
        log.warning("skipped: %s", problem)
    return entries, problems


def build_manifest(params: PrepareParams) -> dict[str, Any]:
    """The manifest of every data set in ``params`` (see the module docstring)."""
    if not params.datasets:
        raise InputError("prepare.datasets is empty: list at least one data set in params.yaml")
    datasets: dict[str, Any] = {}
    for spec in params.datasets:
        if spec.name in datasets or "/" in spec.name:
            raise InputError(f"dataset name {spec.name!r} is repeated or contains '/'")
        entries, problems = prepare_dataset(spec, params.policy)
        counts: dict[str, int] = {}
        for e in entries:
            counts[e["split"]] = counts.get(e["split"], 0) + 1
        datasets[spec.name] = {
            "root": spec.root,
            "pairs": sorted(entries, key=lambda e: natural_key(e["id"])),
            "splits": dict(sorted(counts.items())),
            "rejected": problems,
        }
    return {"version": MANIFEST_VERSION, "policy": params.policy, "datasets": datasets}


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The prepare stage's manifest file; a missing, unreadable or foreign file raises InputError."""
    try:
        manifest = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such manifest (run the prepare stage)") from None
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not a readable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise InputError(f"{path}: not a version-{MANIFEST_VERSION} cs2fusion manifest; rerun the prepare stage")
    return manifest


def select(manifest: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Entries of ``<dataset>/<split>`` (or every pair of ``<dataset>``); ``a/x+b/y`` is the union of its parts, in
    order (validation on held-out pairs of several data sets as one set)."""
    parts = set_parts(name)
    if len(parts) > 1:
        return [entry for part in parts for entry in select(manifest, part)]
    dataset, _, split = name.partition("/")
    if dataset not in manifest["datasets"]:
        raise InputError(f"{name}: no data set {dataset!r} in the manifest ({', '.join(manifest['datasets'])})")
    entries = manifest["datasets"][dataset]["pairs"]
    chosen = [e for e in entries if not split or e["split"] == split]
    if not chosen:
        raise InputError(f"{name}: no pairs in that split")
    return chosen
