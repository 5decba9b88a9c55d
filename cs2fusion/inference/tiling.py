"""Exact tiled inference for large images. The DDM gates pool over the whole image, so tiles are run in four passes
(three to collect the exact global max/mean of each gated decoder layer, one to produce the output), each tile with
an 8-pixel halo (the receptive field): the result equals the whole-image one with bounded memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from cs2fusion.inference.graph import InferenceGraph

HALO = 8  # receptive-field radius of the output: 4 encoder convs + 4 decoder convs, all 3×3
Box = tuple[int, int, int, int]


def tiles(h: int, w: int, tile: int) -> Iterator[tuple[Box, Box]]:
    """(core box, padded box) of every tile; the padded box adds the halo, clipped to the image."""
    for t0 in range(0, h, tile):
        for l0 in range(0, w, tile):
            t1, l1 = min(t0 + tile, h), min(l0 + tile, w)
            yield (t0, t1, l0, l1), (max(0, t0 - HALO), min(h, t1 + HALO), max(0, l0 - HALO), min(w, l1 + HALO))


def fuse_tiled(graph: InferenceGraph, vis_y: torch.Tensor, ir: torch.Tensor, tile: int) -> torch.Tensor:
    """One image (1, 1, H, W) on 0–255 → fused Y (1, 1, H, W) fp32, through ``graph.run`` tile by tile."""
    _, _, h, w = vis_y.shape
    gates: list[torch.Tensor] = []
    out = torch.empty((1, 1, h, w), dtype=torch.float32, device=vis_y.device)
    for level in range(4):
        pooled_max = pooled_sum = None
        for (t0, t1, l0, l1), (p0, p1, q0, q1) in tiles(h, w, tile):
            y = graph.run(vis_y[:, :, p0:p1, q0:q1], ir[:, :, p0:p1, q0:q1], gates, upto=level)
            y = y[:, :, t0 - p0 : t1 - p0, l0 - q0 : l1 - q0]
            if level == 3:
                out[:, :, t0:t1, l0:l1] = y
                continue
            tile_max, tile_sum = y.amax((2, 3)).float(), y.float().sum((2, 3), dtype=torch.float64)
            pooled_max = tile_max if pooled_max is None else torch.maximum(pooled_max, tile_max)
            pooled_sum = tile_sum if pooled_sum is None else pooled_sum + tile_sum
        if level < 3:
            gates.append(graph.gate(level, pooled_max, (pooled_sum / (h * w)).float()))
    return out
