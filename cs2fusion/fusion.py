"""Inference: the fast fused-Y path, exact tiled fusion for large images, and the colour round trip.

The network fuses luminance only; a colour visible image gives its Cb/Cr back to the fused Y (BT.601 full
range), a grey one gives a grey output. Output pixels are clipped and truncated to uint8 as the release does.

Fast path (:class:`InferenceGraph`): the same arithmetic as :class:`~cs2fusion.model.Backbone` in inference
form — 0–255 inputs without the scale round trip, the three DDM query convolutions (which only depend on the
encoders) merged into one convolution over both branches at once, channels-last tensors, no autograd, and
optional bf16 autocast. Tiled path: the DDM gates pool over the whole image, so tiles are run in four passes
(three to collect the exact global max/mean of each gated decoder layer, one to produce the output), each tile
with an 8-pixel halo (the receptive field), so the result equals the whole-image one with bounded memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cs2fusion.color import rgb_to_ycbcr_bt601_full, to_uint8, ycbcr_to_rgb_bt601_full
from cs2fusion.io import InputError
from cs2fusion.model import Backbone

HALO = 8  # receptive-field radius of the output: 4 encoder convs + 4 decoder convs, all 3×3


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    """How to run inference. ``tile`` > 0 runs exact tiles of that size once an image exceeds ``max_pixels``."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fast: bool = True
    tile: int = 512
    max_pixels: int = 4_000_000
    channels_last: bool = True


class InferenceGraph:
    """The backbone's forward pass rearranged for inference (see the module docstring); same output."""

    def __init__(self, backbone: Backbone, *, channels_last: bool = True, dtype: torch.dtype = torch.float32) -> None:
        self.slope = backbone.params.negative_slope
        self.dtype = dtype
        low = lambda c: (c.weight.detach().to(dtype), c.bias.detach().to(dtype))  # noqa: E731
        full = lambda c: (c.weight.detach(), c.bias.detach())  # noqa: E731
        # In reduced precision the first conv (raw 0–255 input) and the output conv stay fp32: they are cheap
        # and carry most of the rounding error that would reach the fused grey levels.
        self.encoders = [
            [full(e.conv1), *(low(c) for c in (e.conv2, e.conv3, e.conv4))]
            for e in (backbone.encoder_vis, backbone.encoder_ir)
        ]
        self.decoder = [*(low(c) for c in list(backbone.decoder)[:3]), full(backbone.decoder[3])]
        self.query_w = torch.cat([d.query.weight.detach() for d in backbone.ddm]).to(dtype)
        self.query_b = torch.cat([d.query.bias.detach() for d in backbone.ddm]).to(dtype)
        self.query_split = [d.query.out_channels for d in backbone.ddm]
        self.gates = [(d.gate.weight.detach()[:, :, 1, 1], d.gate.bias.detach()) for d in backbone.ddm]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu_(x, self.slope)

    def _conv(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.conv2d(x, wb[0], wb[1], padding=1)

    def encode(self, x: torch.Tensor, branch: int) -> torch.Tensor:
        """(N, 1, H, W) on 0–255 → stacked features [e4, e3, e2, e1] (N, 64, H, W)."""
        c1, c2, c3, c4 = self.encoders[branch]
        e1 = self._act(self._conv(x, c1)).to(self.dtype)
        e2 = self._act(self._conv(e1, c2))
        e21 = torch.cat([e2, e1], 1)
        e3 = self._act(self._conv(e21, c3))
        e4 = self._act(self._conv(torch.cat([e3, e21], 1), c4))
        return torch.cat([e4, e3, e21], 1)

    def features(self, vis_y: torch.Tensor, ir: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoder output F_c and the three (ungated) DDM queries Q1..Q3."""
        vis_y = vis_y.contiguous(memory_format=self.memory_format)
        ir = ir.contiguous(memory_format=self.memory_format)
        f_vis, f_ir = self.encode(vis_y, 0), self.encode(ir, 1)
        q = self._act(F.conv2d(torch.cat([f_vis, f_ir], 0), self.query_w, self.query_b, padding=1))
        n = vis_y.shape[0]
        queries = list(torch.split(q[:n] + q[n:], self.query_split, dim=1))
        return torch.cat([f_vis, f_ir], 1), queries

    def gate(self, level: int, pooled_max: torch.Tensor, pooled_mean: torch.Tensor) -> torch.Tensor:
        w, b = self.gates[level]
        s = torch.sigmoid(F.linear(torch.cat([pooled_max, pooled_mean], 1).float(), w, b))
        return s[:, :, None, None]

    def decode(self, fc: torch.Tensor, queries: list[torch.Tensor], gates: list[torch.Tensor],
               upto: int = 3) -> torch.Tensor:
        """Decoder layers 0..``upto`` with known gates for the levels before ``upto``; gates computed from the
        (whole) tensor for the others. Returns decoder layer ``upto`` (the fused Y when ``upto`` is 3)."""
        x = fc
        for level in range(upto):
            d = self._act(self._conv(x, self.decoder[level]))
            s = gates[level] if level < len(gates) else self.gate(level, d.amax((2, 3)), d.float().mean((2, 3)))
            x = d + s.to(d.dtype) * queries[level]
        if upto == 3:
            return self._conv(x.float(), self.decoder[3])
        return self._act(self._conv(x, self.decoder[upto]))

    def __call__(self, vis_y: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) float on 0–255 → fused Y on 0–255."""
        fc, queries = self.features(vis_y, ir)
        return self.decode(fc, queries, [])

    def tiled(self, vis_y: torch.Tensor, ir: torch.Tensor, tile: int) -> torch.Tensor:
        """Exact tiled inference (four passes over ``tile``×``tile`` tiles with an 8-pixel halo)."""
        n, _, h, w = vis_y.shape
        gates: list[torch.Tensor] = []
        for level in range(4):
            pooled_max = pooled_sum = None
            out = torch.empty((n, 1, h, w), dtype=torch.float32) if level == 3 else None
            for (t0, t1, l0, l1), (p0, p1, q0, q1) in _tiles(h, w, tile):
                fc, queries = self.features(vis_y[:, :, p0:p1, q0:q1], ir[:, :, p0:p1, q0:q1])
                y = self.decode(fc, queries, gates, upto=level)[:, :, t0 - p0 : t1 - p0, l0 - q0 : l1 - q0]
                if level == 3:
                    out[:, :, t0:t1, l0:l1] = y.float()
                    continue
                tile_max, tile_sum = y.amax((2, 3)).float(), y.float().sum((2, 3), dtype=torch.float64)
                pooled_max = tile_max if pooled_max is None else torch.maximum(pooled_max, tile_max)
                pooled_sum = tile_sum if pooled_sum is None else pooled_sum + tile_sum
            if level < 3:
                gates.append(self.gate(level, pooled_max, (pooled_sum / (h * w)).float()))
        return out


def _tiles(h: int, w: int, tile: int) -> Iterator[tuple[tuple[int, int, int, int], tuple[int, int, int, int]]]:
    """(core box, padded box) of every tile; the padded box adds the halo, clipped to the image."""
    for t0 in range(0, h, tile):
        for l0 in range(0, w, tile):
            t1, l1 = min(t0 + tile, h), min(l0 + tile, w)
            yield (t0, t1, l0, l1), (max(0, t0 - HALO), min(h, t1 + HALO), max(0, l0 - HALO), min(w, l1 + HALO))


def _as_batch(arrays: list[np.ndarray], name: str) -> torch.Tensor:
    for a in arrays:
        if a.ndim != 2:
            raise InputError(f"{name}: expected (H, W) arrays, got shape {a.shape}")
    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))[:, None]


class Fuser:
    """Fuses pairs with one backbone; ``fuse_y`` is the float core, ``fuse`` the image API."""

    def __init__(self, backbone: Backbone, *, device: str | torch.device = "cpu",
                 options: FuseOptions = FuseOptions()) -> None:
        self.device = torch.device(device)
        self.options = options
        self.backbone = backbone.to(self.device).eval()
        self.scale = float(backbone.params.input_scale)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[options.precision]
        self.graph = (InferenceGraph(self.backbone, channels_last=options.channels_last, dtype=dtype)
                      if options.fast else None)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.options.precision == "fp32" or self.graph is not None:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def fuse_y_batch(self, vis_y: list[np.ndarray], ir: list[np.ndarray]) -> list[np.ndarray]:
        """Same-size (H, W) float 0–255 arrays → fused Y float32 (H, W) each, on the 0–255 scale."""
        if len({a.shape for a in (*vis_y, *ir)}) != 1:
            raise InputError(f"a batch needs one size, got {sorted({a.shape for a in (*vis_y, *ir)})}")
        v = _as_batch(vis_y, "vis_y").to(self.device)
        i = _as_batch(ir, "ir").to(self.device)
        h, w = v.shape[2:]
        with self._autocast():
            if self.graph is None:
                out = self.backbone(vis_y=v / self.scale, ir=i / self.scale).fused * self.scale
            elif self.options.tile and h * w > self.options.max_pixels:
                out = self.graph.tiled(v, i, self.options.tile)
            else:
                out = self.graph(v, i)
        out = out.float().cpu().numpy()[:, 0]
        return list(out)

    def fuse_y(self, *, vis_y: np.ndarray, ir: np.ndarray) -> np.ndarray:
        """vis_y, ir: (H, W) float 0–255 → fused Y, float32 (H, W) on the same 0–255 scale."""
        if vis_y.shape != ir.shape:
            raise InputError(f"visible {vis_y.shape} and infrared {ir.shape} differ in size")
        return self.fuse_y_batch([vis_y], [ir])[0]

    def fuse(self, *, vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        """vis: uint8 (H, W) or (H, W, 3); ir: uint8 (H, W) → fused uint8 image, colour if ``vis`` is."""
        if vis.ndim == 3:
            y, cb, cr = rgb_to_ycbcr_bt601_full(vis)
            return to_uint8(ycbcr_to_rgb_bt601_full(self.fuse_y(vis_y=y, ir=ir), cb, cr))
        return to_uint8(self.fuse_y(vis_y=vis.astype(np.float32), ir=ir))
