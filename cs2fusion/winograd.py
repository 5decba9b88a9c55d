"""Winograd F(4×4, 3×3) for the inference graph's head: the decoder's first conv and the three DDM query convs.

They are 80 % of the network's multiplications and all read the two encoders' features, so one input transform
serves all of them, and F(4, 3) needs 4× fewer products than the direct conv (Lavin & Gray, 2016). The transforms
and products run in a compiled kernel (``kernels/winograd_head.cpp``); this module prepares its weights. In bf16 only
the products' operands are bf16 (fp32 transforms and accumulation): end to end about as close to fp32 as bf16
direct convs (mean |Δ| 0.14–0.22 vs 0.13–0.21 grey levels on five real pairs).
"""

from __future__ import annotations

from types import ModuleType

import torch

from cs2fusion.model import Backbone

# F(4, 3)'s filter transform G (the data and output transforms are written out in the kernel).
G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]


def transform_weights(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) → (36, C_in, C_out): G g Gᵀ per channel pair, computed in fp64."""
    g = torch.tensor(G, dtype=torch.float64)
    u = torch.einsum("ai,ocij,bj->aboc", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[0], weight.shape[1]).transpose(1, 2).float().contiguous()


class WinogradHead:
    """d1 = act(dec1([F_vis, F_ir])) and, per DDM level, the ungated act(q(F_vis)) + act(q(F_ir)), on CPU in fp32
    or bf16 (features and outputs of ``dtype``; bf16 needs ``kernel.bf16_supported()``)."""

    def __init__(self, backbone: Backbone, kernel: ModuleType, band_cols: int = 32,
                 dtype: torch.dtype = torch.float32) -> None:
        dec1, queries = backbone.decoder[0], [d.query for d in backbone.ddm]
        half = dec1.in_channels // 2  # dec1 reads [F_vis, F_ir]: one transformed weight per branch
        uq = transform_weights(torch.cat([q.weight for q in queries]))
        per_branch = [torch.cat([transform_weights(w), uq], 2) for w in (dec1.weight[:, :half], dec1.weight[:, half:])]
        u = torch.stack(per_branch, 1).flatten(0, 1).contiguous()  # (72, 64, 176): position, then branch
        self.u = kernel.vnni_pairs(u.to(dtype)) if dtype == torch.bfloat16 else u
        self.bias = torch.cat([dec1.bias.detach(), *(q.bias.detach() for q in queries)]).float().contiguous()
        self.query_channels = [q.out_channels for q in queries]
        self.slope = backbone.params.negative_slope
        self.kernel, self.band_cols = kernel, band_cols

    def __call__(self, feats: torch.Tensor, d1: torch.Tensor, queries: list[torch.Tensor]) -> None:
        """feats (2, 64, H, W), d1 (1, 64, H, W) and queries (1, C_k, H, W): channels-last, the head's dtype;
        outputs filled."""
        outs = [t.permute(0, 2, 3, 1)[0] for t in (d1, *queries)]
        self.kernel.winograd_head(feats.permute(0, 2, 3, 1), self.u, self.bias, outs, self.slope, self.band_cols)
