"""Inference: the fast fused-Y path, exact tiled fusion for large images, and the colour round trip.

The network fuses luminance only; a colour visible image gives its Cb/Cr back to the fused Y (BT.601 full
range), a grey one gives a grey output. Output pixels are clipped and truncated to uint8 as the release does.

Fast path (:class:`InferenceGraph`): the same arithmetic as :class:`~cs2fusion.model.Backbone` in inference
form. Every activation lives in channels-last views of one reused buffer (an arena), and on CPU each conv writes
into its view through oneDNN's in-place sum post-op, so a forward pass neither allocates nor page-faults fresh
memory (the straightforward path spends nearly half of a 640×480 pair on that). A DDM gate is a positive scalar,
so it is folded into its query conv's weights (LeakyReLU is positively homogeneous); both branches' queries run
as one batch-of-two conv; the one-channel first conv is a matrix product; pooling reduces flat views. On CPU
the head (the decoder's first conv and the three query convs, 80 % of the multiplications) runs as one Winograd
F(4, 3) kernel (:mod:`cs2fusion.winograd`) where it can be built, the gates then scaling the ungated query sums; in
bf16 it multiplies bf16 operands with fp32 transforms and accumulation (where the CPU has bf16 products). bf16
keeps the first conv (raw 0–255 input) and the output conv in fp32. Denormals are flushed while the graph runs
(they slow oneDNN's convs down ten-fold on some CPUs). Tiled path: the DDM gates pool
over the whole image, so tiles are run in four passes (three to collect the exact global max/mean of each gated
decoder layer, one to produce the output), each tile with an 8-pixel halo (the receptive field), so the result
equals the whole-image one with bounded memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cs2fusion import kernels
from cs2fusion.color import rgb_to_ycbcr_bt601_full, to_uint8, ycbcr_to_rgb_bt601_full
from cs2fusion.io import InputError
from cs2fusion.model import Backbone
from cs2fusion.winograd import WinogradHead

HALO = 8  # receptive-field radius of the output: 4 encoder convs + 4 decoder convs, all 3×3
CL = torch.channels_last
_HEAD_DTYPES = (torch.float32, torch.bfloat16)  # the Winograd head's dtypes


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    """How to run inference. ``tile`` > 0 runs exact tiles of that size once an image exceeds ``max_pixels``;
    ``winograd``: the CPU fast path's head (fp32, bf16) as a compiled Winograd kernel (direct convs where it cannot
    build, or for bf16 where the CPU has no bf16 products)."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fast: bool = True
    winograd: bool = True
    tile: int = 512
    max_pixels: int = 4_000_000


@functools.cache
def _onednn_inplace_conv(dtype: torch.dtype) -> bool:
    """Whether this torch build has oneDNN's in-place conv (``out += conv(x)``) for ``dtype``, checked on a
    tiny conv against F.conv2d (it is an internal op, so the fast path falls back to F.conv2d without it)."""
    try:
        x = torch.arange(2 * 5 * 6, dtype=torch.float32).view(1, 2, 5, 6).contiguous(memory_format=CL) / 60
        w = torch.linspace(-1, 1, 3 * 2 * 9).view(3, 2, 3, 3)
        out = torch.zeros(1, 3, 5, 6).contiguous(memory_format=CL).to(dtype)
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x.to(dtype), w.to(dtype), None, [1, 1], [1, 1], [1, 1], 1, "add", None, None, [], None)
        return bool(torch.allclose(out.float(), F.conv2d(x, w, padding=1), atol=0.05))
    except (AttributeError, RuntimeError):
        return False


class _Arena:
    """A flat buffer that grows to the largest image seen and is handed out as channels-last views."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.flat = torch.empty(0, dtype=dtype, device=device)
        self.used = 0

    def reset(self, numel: int) -> None:
        if self.flat.numel() < numel:
            self.flat = torch.empty(numel, dtype=self.flat.dtype, device=self.flat.device)
        self.used = 0

    def take_flat(self, numel: int) -> torch.Tensor:
        if self.used + numel > self.flat.numel():
            raise RuntimeError("inference arena too small (a budget in InferenceGraph is wrong)")
        self.used += numel
        return self.flat[self.used - numel : self.used]

    def take(self, n: int, c: int, h: int, w: int) -> torch.Tensor:
        return _channels_last_view(self.take_flat(n * c * h * w), n, c, h, w)


@contextlib.contextmanager
def _flush_denormals(device: torch.device) -> Iterator[None]:
    """Denormals as zero on CPU while in scope, restoring the caller's setting: real images produce denormals in
    the convs, and on some CPUs (measured on Sapphire Rapids) they slow oneDNN's direct convs down ten-fold.
    Values below 1e-38 do not reach the 0–255 output."""
    if device.type != "cpu" or _denormals_flushed():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _denormals_flushed() -> bool:
    """Whether this thread already treats denormals as zero (torch has no getter for the setting)."""
    return torch.tensor([1e-40]).mul(1.0).item() == 0.0


def _channels_last_view(flat: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """The first n·c·h·w elements of a flat buffer as a channels-last (n, c, h, w) tensor."""
    return flat[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


def _flat_rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (1, C, H, W) tensor as its (H·W, C) matrix, without a copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def pooled_max_sum(x: torch.Tensor, rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and fp32 sum of a channels-last (1, C, H, W) tensor → two (1, C) fp32 tensors.

    Reduces row chunks widened to 16 pixels × C columns: much faster than reducing over (2, 3) when C is small
    or the dtype is bf16, and the fp32 sum stays exact enough for the DDM gates."""
    c = x.shape[1]
    maxes, sums = [], []
    for chunk in _flat_rows(x).split(rows):
        chunk = chunk.float()
        if chunk.shape[0] % 16 == 0:
            chunk = chunk.view(-1, 16 * c)
        maxes.append(chunk.amax(0).view(-1, c).amax(0))
        sums.append(chunk.sum(0).view(-1, c).sum(0))
    return torch.stack(maxes).amax(0, keepdim=True), torch.stack(sums).sum(0, keepdim=True)


class InferenceGraph:
    """The backbone's forward pass rearranged for inference (see the module docstring); same output.

    Runs one image at a time (a batch is a loop: on CPU one image already fills the cores). The arena keeps
    about 23 × 16 channels of the largest image fused so far (450 MB for 640×480 in fp32) between calls, and a
    lock makes concurrent callers (a threaded model server) take turns on it.
    """

    def __init__(self, backbone: Backbone, *, dtype: torch.dtype = torch.float32, winograd: bool = True) -> None:
        device = next(backbone.parameters()).device
        self.slope = backbone.params.negative_slope
        self.dtype = dtype
        self.onednn = device.type == "cpu" and _onednn_inplace_conv(dtype)
        c = backbone.params.channels
        self.c = c
        # Arena budget in channels: both branches' encoder outputs (2 × 4c), then the larger of the encoder's
        # scratch (e1 in fp32 and in dtype, e2, e3, e4, [e2, e1], [e3, e2, e1]: 10c) and the decoder's
        # (d1 4c, the two-branch query 2 × 4c, d2 2c, d3 c: 15c; with the Winograd head d1 4c, the three query
        # sums 7c, d2, d3: 14c).
        self.budget = 8 * c + max(10 * c, 15 * c)

        def prep(conv: torch.nn.Conv2d, dt: torch.dtype = dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return conv.weight.detach().to(dt).contiguous(memory_format=CL), conv.bias.detach().to(dt)

        # In reduced precision the first conv (raw 0–255 input) and the output conv stay fp32: they are cheap
        # and carry most of the rounding error that would reach the fused grey levels.
        self.encoders = [
            [prep(e.conv1, torch.float32), *(prep(k) for k in (e.conv2, e.conv3, e.conv4))]
            for e in (backbone.encoder_vis, backbone.encoder_ir)
        ]
        w1, self.dec1_bias = prep(backbone.decoder[0])
        enc = w1.shape[1] // 2  # the decoder's first conv reads [F_vis, F_ir]: split it into one conv per branch
        self.dec1 = (w1[:, :enc].contiguous(memory_format=CL), w1[:, enc:].contiguous(memory_format=CL))
        self.decoder = [prep(backbone.decoder[1]), prep(backbone.decoder[2]), prep(backbone.decoder[3], torch.float32)]
        self.queries = [prep(d.query, torch.float32) for d in backbone.ddm]  # scaled by the gate, then cast
        self.gates = [(d.gate.weight.detach()[:, :, 1, 1], d.gate.bias.detach()) for d in backbone.ddm]
        kernel = kernels.winograd_head() if winograd and device.type == "cpu" and dtype in _HEAD_DTYPES else None
        if kernel is not None and dtype == torch.bfloat16 and not kernel.bf16_supported():
            kernel = None  # no bf16 products on this CPU: direct bf16 convs
        self.head = WinogradHead(backbone, kernel, dtype=dtype) if kernel is not None else None
        self.arenas = {dt: _Arena(dt, device) for dt in {dtype, torch.float32}}
        self.lock = threading.Lock()

    def _conv(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *,
              accumulate: bool = False, act: bool = True) -> torch.Tensor:
        """``out`` (+)= conv3x3(x, w) + b, in place, then LeakyReLU if ``act``."""
        if self.onednn:
            if not accumulate:
                out.zero_()
            torch.ops.mkldnn._convolution_pointwise_.binary(
                out, x, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, None, [], None)
        else:
            y = F.conv2d(x, w, b, padding=1)
            out.add_(y) if accumulate else out.copy_(y)
        return F.leaky_relu_(out, self.slope) if act else out

    def _encode(self, x: torch.Tensor, branch: int, out: torch.Tensor) -> None:
        """(1, 1, H, W) on 0–255 → [e4, e3, e2, e1] written into ``out`` (1, 4c, H, W)."""
        (w1, b1), c2, c3, c4 = self.encoders[branch]
        arena, c = self.arenas[self.dtype], self.c
        h, w = x.shape[2:]
        e1 = self.arenas[torch.float32].take(1, c, h, w)
        # One input channel: 9 taps × c outputs as a matrix product written straight into e1 (3× faster than
        # oneDNN here, which reorders a one-channel input).
        torch.addmm(b1, F.unfold(x, 3, padding=1)[0].t(), w1.reshape(c, 9).t(), out=_flat_rows(e1))
        F.leaky_relu_(e1, self.slope)
        if self.dtype != torch.float32:
            e1 = arena.take(1, c, h, w).copy_(e1)
        e2 = self._conv(arena.take(1, c, h, w), e1, *c2)
        e21 = torch.cat([e2, e1], 1, out=arena.take(1, 2 * c, h, w))
        e3 = self._conv(arena.take(1, c, h, w), e21, *c3)
        e321 = torch.cat([e3, e21], 1, out=arena.take(1, 3 * c, h, w))
        e4 = self._conv(arena.take(1, c, h, w), e321, *c4)
        torch.cat([e4, e321], 1, out=out)

    def gate(self, level: int, pooled_max: torch.Tensor, pooled_mean: torch.Tensor) -> torch.Tensor:
        """DDM gate (1, 1) from the decoder layer's global max and mean (1, C)."""
        w, b = self.gates[level]
        return torch.sigmoid(F.linear(torch.cat([pooled_max, pooled_mean], 1).float(), w, b))

    def _run(self, vis_y: torch.Tensor, ir: torch.Tensor, gates: list[torch.Tensor], upto: int = 3) -> torch.Tensor:
        """One image (1, 1, H, W) float on 0–255 → the fused Y (``upto`` 3), or decoder layer ``upto`` (0..2)
        before its gate, as an arena view valid until the next call. Gates are taken from ``gates`` for the
        levels it covers and computed from this (whole) image for the others."""
        h, w = vis_y.shape[2:]
        c, dt = self.c, self.dtype
        arena = self.arenas[dt]
        arena.reset(self.budget * h * w)
        feats = arena.take(2, 4 * c, h, w)
        mark = arena.used
        for branch, x in enumerate((vis_y, ir)):
            arena.used = mark  # the encoder's scratch is reused by the second branch, then by the decoder
            if dt != torch.float32:
                self.arenas[torch.float32].reset(c * h * w)  # e1 before its cast
            self._encode(x.contiguous(), branch, feats[branch : branch + 1])
        arena.used = mark
        x = arena.take(1, 4 * c, h, w)
        if self.head is not None:
            query_sums = [arena.take(1, qw.shape[0], h, w) for qw, _ in self.queries]
            self.head(feats, x, query_sums)
        else:
            x = self._conv(x, feats[0:1], self.dec1[0], self.dec1_bias, act=False)
            x = self._conv(x, feats[1:2], self.dec1[1], None, accumulate=True)
            query = arena.take_flat(2 * 4 * c * h * w)  # each level's two-branch query, narrower at each level
        for level in range(3):
            if level == upto:
                return x
            if level < len(gates):
                s = gates[level]
            else:
                pooled_max, pooled_sum = pooled_max_sum(x)
                s = self.gate(level, pooled_max, pooled_sum / (h * w))
            if self.head is not None:
                x.add_(query_sums[level], alpha=s.item())
            else:
                qw, qb = self.queries[level]
                q = self._conv(_channels_last_view(query, 2, qw.shape[0], h, w), feats, (qw * s).to(dt),
                               (qb * s.flatten()).to(dt))
                x.add_(q[0:1]).add_(q[1:2])
            if level < 2:
                wd, bd = self.decoder[level]
                x = self._conv(arena.take(1, wd.shape[0], h, w), x, wd, bd)
        w_out, b_out = self.decoder[2]
        return F.conv2d(x.float(), w_out, b_out, padding=1)

    def __call__(self, vis_y: torch.Tensor, ir: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) float on 0–255 → fused Y (N, 1, H, W) fp32 on 0–255."""
        with self.lock, _flush_denormals(vis_y.device):
            return torch.cat([self._run(vis_y[k : k + 1], ir[k : k + 1], []) for k in range(vis_y.shape[0])])

    def tiled(self, vis_y: torch.Tensor, ir: torch.Tensor, tile: int) -> torch.Tensor:
        """Exact tiled inference (four passes over ``tile``×``tile`` tiles with an 8-pixel halo)."""
        with self.lock, _flush_denormals(vis_y.device):
            return torch.cat([self._tiled_one(vis_y[k : k + 1], ir[k : k + 1], tile) for k in range(vis_y.shape[0])])

    def _tiled_one(self, vis_y: torch.Tensor, ir: torch.Tensor, tile: int) -> torch.Tensor:
        _, _, h, w = vis_y.shape
        gates: list[torch.Tensor] = []
        out = torch.empty((1, 1, h, w), dtype=torch.float32, device=vis_y.device)
        for level in range(4):
            pooled_max = pooled_sum = None
            for (t0, t1, l0, l1), (p0, p1, q0, q1) in _tiles(h, w, tile):
                y = self._run(vis_y[:, :, p0:p1, q0:q1], ir[:, :, p0:p1, q0:q1], gates, upto=level)
                y = y[:, :, t0 - p0 : t1 - p0, l0 - q0 : l1 - q0]
                if level == 3:
                    out[:, :, t0:t1, l0:l1] = y
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
        self.graph = InferenceGraph(self.backbone, dtype=dtype, winograd=options.winograd) if options.fast else None

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
