"""The backbone's forward pass rearranged for inference: same output as :class:`~cs2fusion.model.Backbone`.

Every activation lives in channels-last views of one reused buffer (an arena), and on CPU each conv writes into
its view through oneDNN's in-place sum post-op, so a forward pass neither allocates nor page-faults fresh memory
(the straightforward path spends nearly half of a 640×480 pair on that). Both branches' queries run as one
batch-of-two conv; the one-channel first conv is a matrix product; pooling reduces flat views. The head (decoder
conv 1 + the query convs) is a :mod:`~cs2fusion.inference.heads` implementation chosen once. bf16 keeps the first
conv (raw 0–255 input) and the output conv in fp32. Denormals are flushed while the graph runs (they slow
oneDNN's convs down ten-fold on some CPUs).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from cs2fusion.inference.buffers import Arena, flat_rows, flush_denormals, pooled_max_sum
from cs2fusion.inference.convs import Conv3x3, prepared
from cs2fusion.inference.heads import make_head
from cs2fusion.inference.tiling import fuse_tiled
from cs2fusion.model import Backbone


class InferenceGraph:
    """Fused Y of (N, 1, H, W) pairs on 0–255, one image at a time (on CPU one image already fills the cores).

    The arena keeps about 23 × ``channels`` channels of the largest image fused so far (450 MB for 640×480 in fp32)
    between calls, and a lock makes concurrent callers (a threaded model server) take turns on it.
    """

    def __init__(self, backbone: Backbone, *, dtype: torch.dtype = torch.float32, winograd: bool = True) -> None:
        device = next(backbone.parameters()).device
        self.slope = backbone.params.negative_slope
        self.dtype = dtype
        self.c = c = backbone.params.channels
        self.conv = Conv3x3(device, dtype, self.slope)
        # In reduced precision the first conv (raw 0–255 input) and the output conv stay fp32: they are cheap
        # and carry most of the rounding error that would reach the fused grey levels.
        self.encoders = [
            [prepared(e.conv1, torch.float32), *(prepared(k, dtype) for k in (e.conv2, e.conv3, e.conv4))]
            for e in (backbone.encoder_vis, backbone.encoder_ir)
        ]
        self.decoder = [prepared(backbone.decoder[1], dtype), prepared(backbone.decoder[2], dtype),
                        prepared(backbone.decoder[3], torch.float32)]
        self.gates = [(d.gate.weight.detach()[:, :, 1, 1], d.gate.bias.detach()) for d in backbone.ddm]
        self.head = make_head(backbone, self.conv, dtype, winograd=winograd)
        # Arena budget in channels: both branches' encoder outputs (2 × 4c), then the larger of the encoder's
        # scratch (e1 in fp32 and in dtype, e2, e3, e4, [e2, e1], [e3, e2, e1]: 10c) and the decoder's
        # (d1 4c, the head's scratch, d2 2c, d3 c).
        self.budget = 8 * c + max(10 * c, 7 * c + self.head.scratch_channels)
        self.arenas = {dt: Arena(dt, device) for dt in {dtype, torch.float32}}
        self.lock = threading.Lock()

    def _encode(self, x: torch.Tensor, branch: int, out: torch.Tensor) -> None:
        """(1, 1, H, W) on 0–255 → [e4, e3, e2, e1] written into ``out`` (1, 4c, H, W)."""
        (w1, b1), c2, c3, c4 = self.encoders[branch]
        arena, c = self.arenas[self.dtype], self.c
        h, w = x.shape[2:]
        e1 = self.arenas[torch.float32].take(1, c, h, w)
        # One input channel: 9 taps × c outputs as a matrix product written straight into e1 (3× faster than
        # oneDNN here, which reorders a one-channel input).
        torch.addmm(b1, F.unfold(x, 3, padding=1)[0].t(), w1.reshape(c, 9).t(), out=flat_rows(e1))
        F.leaky_relu_(e1, self.slope)
        if self.dtype != torch.float32:
            e1 = arena.take(1, c, h, w).copy_(e1)
        e2 = self.conv(arena.take(1, c, h, w), e1, *c2)
        e21 = torch.cat([e2, e1], 1, out=arena.take(1, 2 * c, h, w))
        e3 = self.conv(arena.take(1, c, h, w), e21, *c3)
        e321 = torch.cat([e3, e21], 1, out=arena.take(1, 3 * c, h, w))
        e4 = self.conv(arena.take(1, c, h, w), e321, *c4)
        torch.cat([e4, e321], 1, out=out)

    def gate(self, level: int, pooled_max: torch.Tensor, pooled_mean: torch.Tensor) -> torch.Tensor:
        """DDM gate (1, 1) from the decoder layer's global max and mean (1, C)."""
        w, b = self.gates[level]
        return torch.sigmoid(F.linear(torch.cat([pooled_max, pooled_mean], 1).float(), w, b))

    def run(self, vis_y: torch.Tensor, ir: torch.Tensor, gates: list[torch.Tensor], upto: int = 3) -> torch.Tensor:
        """One image (1, 1, H, W) float on 0–255 → the fused Y (``upto`` 3), or decoder layer ``upto`` (0..2)
        before its gate, as an arena view valid until the next call. Gates are taken from ``gates`` for the
        levels it covers and computed from this (whole) image for the others. Callers hold ``lock``."""
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
        add_query = self.head.start(feats, x, arena)
        for level in range(3):
            if level == upto:
                return x
            if level < len(gates):
                s = gates[level]
            else:
                pooled_max, pooled_sum = pooled_max_sum(x)
                s = self.gate(level, pooled_max, pooled_sum / (h * w))
            add_query(level, x, s)
            if level < 2:
                wd, bd = self.decoder[level]
                x = self.conv(arena.take(1, wd.shape[0], h, w), x, wd, bd)
        w_out, b_out = self.decoder[2]
        return F.conv2d(x.float(), w_out, b_out, padding=1)

    def __call__(self, vis_y: torch.Tensor, ir: torch.Tensor, *, tile: int = 0) -> torch.Tensor:
        """(N, 1, H, W) float on 0–255 → fused Y (N, 1, H, W) fp32 on 0–255; ``tile`` > 0: exact tiles of that
        size (bounded memory, the same result)."""
        with self.lock, flush_denormals(vis_y.device):
            one = (lambda v, i: fuse_tiled(self, v, i, tile)) if tile else (lambda v, i: self.run(v, i, []))
            return torch.cat([one(vis_y[k : k + 1], ir[k : k + 1]) for k in range(vis_y.shape[0])])
