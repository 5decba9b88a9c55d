"""Batch fusion of evaluation shards into PNG folders (the fuse stage's library half, no Ray)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

import torch
from tqdm import tqdm

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.config import FuseParams
from cs2fusion.data.shards import iter_eval
from cs2fusion.inference.fuser import FuseOptions, Fuser, resolve_device
from cs2fusion.io import write_png
from cs2fusion.model import Backbone
from cs2fusion.model.weights import load_published_backbone

log = logging.getLogger(__name__)
PUBLISHED = "published:"


def load_backbone(spec: str) -> Backbone:
    """A checkpoint path, or ``published:<folder>`` for the release's weights read directly."""
    if spec.startswith(PUBLISHED):
        backbone = Backbone()
        load_published_backbone(backbone, Path(spec[len(PUBLISHED) :]) / "backbone.pt")
        return backbone.eval()
    return load_checkpoint(spec).backbone


def make_fuser(spec: str, params: FuseParams, device: str | torch.device = "cpu") -> Fuser:
    """The fast-path fuser configured by the ``fuse`` params."""
    if params.threads:
        torch.set_num_threads(params.threads)
    options = FuseOptions(precision=params.precision, tile=params.tile, max_pixels=params.max_pixels,
                          winograd=params.winograd)
    return Fuser(load_backbone(spec), device=device, options=options)


def fused_samples(spec: str, files: list[str], params: FuseParams) -> Iterator[tuple[str, np.ndarray]]:
    """(id, fused uint8 image) of every sample of ``files``, in shard order."""
    fuser = make_fuser(spec, params, resolve_device("auto"))
    for meta, ir, vi in iter_eval(files):
        yield meta["id"], fuser.fuse(vis=vi, ir=ir)


def fuse_shards(spec: str, files: list[str], out: Path, params: FuseParams, *, progress: bool = True) -> int:
    """Fuses every sample of ``files`` into ``out/<id>.png``; returns the count."""
    count = 0
    for pair_id, fused in tqdm(fused_samples(spec, files, params), desc=f"fusing {out.name}", unit="pair",
                               disable=not progress or None):
        write_png(out / f"{pair_id}.png", fused)
        count += 1
    return count
