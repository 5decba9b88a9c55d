"""The head of the inference graph: the decoder's first conv and the three DDM query convs, which all read the two
encoders' features and hold 80 % of the network's multiplications. Two implementations behind one interface,
chosen once per graph by :func:`make_head`:

- :class:`DirectHead`: direct convs (oneDNN in place, or ``F.conv2d``), each DDM gate folded into its query conv's
  weights (a gate is a positive scalar and LeakyReLU is positively homogeneous). Any width, any device.
- :class:`WinogradHead`: the compiled Winograd F(4×4, 3×3) kernel (``kernels/winograd_head.cpp``; Lavin & Gray,
  2016): one input transform serves all four convs and F(4, 3) needs 4× fewer products. CPU, fp32 or bf16 (bf16
  operands, fp32 transforms and accumulation: end to end about as close to fp32 as bf16 direct convs, mean |Δ|
  0.14–0.22 vs 0.13–0.21 grey levels on five real pairs), and only the feature width the kernel was built for.

A head's :meth:`start` fills the decoder's first layer and returns ``add_query(level, x, gate)``, which adds
``gate · (act(q(F_vis)) + act(q(F_ir)))`` of that DDM level to ``x``.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Callable, Protocol

import torch

from cs2fusion.inference import kernels
from cs2fusion.inference.buffers import Arena, channels_last_view
from cs2fusion.inference.convs import CL, Conv3x3, prepared
from cs2fusion.model import Backbone

log = logging.getLogger(__name__)
AddQuery = Callable[[int, torch.Tensor, torch.Tensor], None]
WINOGRAD_DTYPES = (torch.float32, torch.bfloat16)

# F(4, 3)'s filter transform G (the data and output transforms are written out in the kernel).
G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]


class Head(Protocol):
    """What the graph needs of a head."""

    scratch_channels: int  # per-pixel channels it takes from the arena after the decoder's first layer

    def start(self, feats: torch.Tensor, d1: torch.Tensor, arena: Arena) -> AddQuery: ...


def _query_channels(backbone: Backbone) -> list[int]:
    return [d.query.out_channels for d in backbone.ddm]


class DirectHead:
    """Direct 3×3 convs; the decoder's first conv split per branch and accumulated in place (no concat)."""

    def __init__(self, backbone: Backbone, conv: Conv3x3, dtype: torch.dtype) -> None:
        w1, self.dec1_bias = prepared(backbone.decoder[0], dtype)
        half = w1.shape[1] // 2  # the decoder's first conv reads [F_vis, F_ir]
        self.dec1 = (w1[:, :half].contiguous(memory_format=CL), w1[:, half:].contiguous(memory_format=CL))
        self.queries = [prepared(d.query, torch.float32) for d in backbone.ddm]  # scaled by the gate, then cast
        self.conv, self.dtype = conv, dtype
        self.scratch_channels = 2 * max(_query_channels(backbone))  # one level's two-branch query at a time

    def start(self, feats: torch.Tensor, d1: torch.Tensor, arena: Arena) -> AddQuery:
        h, w = feats.shape[2:]
        self.conv(d1, feats[0:1], self.dec1[0], self.dec1_bias, act=False)
        self.conv(d1, feats[1:2], self.dec1[1], None, accumulate=True)
        scratch = arena.take_flat(self.scratch_channels * h * w)

        def add_query(level: int, x: torch.Tensor, gate: torch.Tensor) -> None:
            qw, qb = self.queries[level]
            q = channels_last_view(scratch, 2, qw.shape[0], h, w)
            self.conv(q, feats, (qw * gate).to(self.dtype), (qb * gate.flatten()).to(self.dtype))
            x.add_(q[0:1]).add_(q[1:2])

        return add_query


def transform_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) → (36, C_in, C_out): G g Gᵀ per channel pair, computed in fp64."""
    g = torch.tensor(G, dtype=torch.float64)
    u = torch.einsum("ai,ocij,bj->aboc", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).transpose(1, 2).float().contiguous()


class WinogradHead:
    """d1 = act(dec1([F_vis, F_ir])) and, per DDM level, the ungated act(q(F_vis)) + act(q(F_ir)), on CPU in fp32
    or bf16 (features and outputs of ``dtype``; bf16 needs ``kernel.bf16_supported()``); the gates then scale the
    query sums."""

    def __init__(self, backbone: Backbone, kernel: ModuleType, band_cols: int = 32,
                 dtype: torch.dtype = torch.float32) -> None:
        if not self.fits(backbone, kernel):
            raise ValueError(f"the Winograd kernel takes {kernel.input_channels} feature channels per branch, "
                             f"this model has {4 * backbone.params.channels}")
        dec1, queries = backbone.decoder[0], [d.query for d in backbone.ddm]
        half = dec1.in_channels // 2  # dec1 reads [F_vis, F_ir]: one transformed weight per branch
        uq = transform_weights(torch.cat([q.weight for q in queries]))
        per_branch = [torch.cat([transform_weights(w), uq], 2) for w in (dec1.weight[:, :half], dec1.weight[:, half:])]
        u = torch.stack(per_branch, 1).flatten(0, 1).contiguous()  # (72, C_in, C_tot): position, then branch
        self.u = kernel.vnni_pairs(u.to(dtype)) if dtype == torch.bfloat16 else u
        self.bias = torch.cat([dec1.bias.detach(), *(q.bias.detach() for q in queries)]).float().contiguous()
        self.query_channels = _query_channels(backbone)
        self.scratch_channels = sum(self.query_channels)
        self.slope = backbone.params.negative_slope
        self.kernel, self.band_cols = kernel, band_cols

    @staticmethod
    def fits(backbone: Backbone, kernel: ModuleType) -> bool:
        """Whether the kernel was built for this model's feature width (the encoders' 4 × channels)."""
        return 4 * backbone.params.channels == kernel.input_channels

    def __call__(self, feats: torch.Tensor, d1: torch.Tensor, queries: list[torch.Tensor]) -> None:
        """feats (2, C_in, H, W), d1 (1, C_d, H, W) and queries (1, C_k, H, W): channels-last, the head's dtype;
        outputs filled."""
        outs = [t.permute(0, 2, 3, 1)[0] for t in (d1, *queries)]
        self.kernel.winograd_head(feats.permute(0, 2, 3, 1), self.u, self.bias, outs, self.slope, self.band_cols)

    def start(self, feats: torch.Tensor, d1: torch.Tensor, arena: Arena) -> AddQuery:
        h, w = feats.shape[2:]
        sums = [arena.take(1, c, h, w) for c in self.query_channels]
        self(feats, d1, sums)

        def add_query(level: int, x: torch.Tensor, gate: torch.Tensor) -> None:
            x.add_(sums[level], alpha=gate.item())

        return add_query


def make_head(backbone: Backbone, conv: Conv3x3, dtype: torch.dtype, *, winograd: bool) -> Head:
    """The Winograd head where it applies (asked for, CPU, fp32/bf16, the kernel built, the model's width, bf16
    products for bf16), else the direct head."""
    device = next(backbone.parameters()).device
    if winograd and device.type == "cpu" and dtype in WINOGRAD_DTYPES:
        kernel = kernels.winograd_head()
        if kernel is None:
            pass  # the loader has said why
        elif not WinogradHead.fits(backbone, kernel):
            log.debug("Winograd kernel is for %d feature channels, this model has %d: direct convs",
                      kernel.input_channels, 4 * backbone.params.channels)
        elif dtype == torch.bfloat16 and not kernel.bf16_supported():
            log.debug("no bf16 products on this CPU: direct bf16 convs")
        else:
            return WinogradHead(backbone, kernel, dtype=dtype)
    return DirectHead(backbone, conv, dtype)
