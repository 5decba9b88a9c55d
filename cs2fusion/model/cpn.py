"""Compensation perception network (CPN) and the self-correlation + saliency operation (paper §3.3).

Training only. From the (detached) encoder features of both branches the CPN estimates the infrared
compensation map ``w_ir`` in [0, 1] (``w_vis = 1 − w_ir``), and produces the feature maps that the contrastive
losses compare: ``map_ir = w_ir·h``, ``map_vis = w_vis·h`` and the SSO features of each encoder.
The input order of its first conv follows the release's training script: [infrared features, visible features].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cs2fusion.config import ModelParams
from cs2fusion.model.backbone import EncoderFeatures, conv3x3
from cs2fusion.span import LOCAL, BatchSpan


class CPNOutput(NamedTuple):
    """w_ir / w_vis: (N, 1, H, W) compensation maps; map_* and sso_*: (N, 64·H·W) flattened features."""

    w_ir: torch.Tensor
    w_vis: torch.Tensor
    map_ir: torch.Tensor
    map_vis: torch.Tensor
    sso_ir: torch.Tensor
    sso_vis: torch.Tensor


def _stat(x: torch.Tensor, name: str, scope: str, span: BatchSpan) -> torch.Tensor:
    """Statistic ``name`` (amin, amax, mean or std) of ``x`` per sample (``scope="sample"``) or over the whole batch
    ("batch": the global batch of ``span``, all ranks' samples)."""
    if scope == "batch" and not span.local:
        return getattr(span, name)(x)
    dims = tuple(range(1, x.dim())) if scope == "sample" else tuple(range(x.dim()))
    return getattr(x, name)(dim=dims, keepdim=True)


def minmax(x: torch.Tensor, scope: str, span: BatchSpan = LOCAL) -> torch.Tensor:
    """(x − min) / (max − min + 1e-10), per sample (``scope="sample"``) or over the whole tensor ("batch": over the
    global batch of ``span``)."""
    lo, hi = _stat(x, "amin", scope, span), _stat(x, "amax", scope, span)
    return (x - lo) / (hi - lo + 1e-10)


def robust_minmax(x: torch.Tensor, scope: str, spread: float = 2.0, span: BatchSpan = LOCAL) -> torch.Tensor:
    """Min-max with the range taken as mean ± ``spread``·std and the rest clamped: unlike :func:`minmax`, no handful
    of pixels sets the range, so the map cannot drift to 1 almost everywhere (its mean stays near 0.5 whatever its
    shape). A two-level input (std = half the gap) spans 0.5 ± 0.25 at spread 2 and 0–1 at spread 1."""
    mean, std = _stat(x, "mean", scope, span), _stat(x, "std", scope, span)
    return ((x - mean) / (2 * spread * std + 1e-10) + 0.5).clamp(0.0, 1.0)




def saliency_operation(e: torch.Tensor, scope: str, span: BatchSpan = LOCAL) -> torch.Tensor:
    """SSO(e) = minmax(clamp(e − mean(e), 1e-10)) + softmax(f fᵀ) f + e, with f = e as (N, C, H·W)."""
    n, c, h, w = e.shape
    f = e.reshape(n, c, h * w)
    corr = torch.softmax(torch.bmm(f, f.transpose(1, 2)), dim=1)
    self_corr = torch.bmm(corr, f).reshape(n, c, h, w)
    return minmax((e - _stat(e, "mean", scope, span)).clamp(min=1e-10), scope, span) + self_corr + e


def sso_features(feats: EncoderFeatures, scope: str, span: BatchSpan = LOCAL) -> torch.Tensor:
    """[SSO(e1), SSO(e2), SSO(e3), SSO(e4)] of one encoder, flattened per sample: (N, 4C·H·W)."""
    return torch.cat([saliency_operation(e, scope, span) for e in feats], dim=1).flatten(1)


class CompensationPerceptionNetwork(nn.Module):
    """Estimates the IR compensation map from the concatenated encoder features (the published ``Fusion_strage``)."""

    def __init__(self, params: ModelParams = ModelParams()) -> None:
        super().__init__()
        enc = 4 * params.channels
        self.params = params
        self.conv = conv3x3(2 * enc, enc)
        self.estimator = conv3x3(enc, 1)

    def forward(self, *, ir: EncoderFeatures, vis: EncoderFeatures, span: BatchSpan = LOCAL) -> CPNOutput:
        """ir, vis: encoder features of each branch (detached here, so no gradient reaches the backbone); ``span``:
        the global batch that batch-scope normalisation runs over (data-parallel training)."""
        ir = EncoderFeatures(*(t.detach() for t in ir))
        vis = EncoderFeatures(*(t.detach() for t in vis))
        scope = self.params.norm_scope
        h = F.leaky_relu(self.conv(torch.cat([ir.stacked(), vis.stacked()], dim=1)), self.params.negative_slope)
        raw = self.estimator(h)
        if self.params.map_norm == "robust":
            w_ir = robust_minmax(raw, scope, self.params.map_spread, span=span)
        else:
            w_ir = minmax(raw, scope, span=span)
        w_vis = 1.0 - w_ir
        return CPNOutput(
            w_ir=w_ir,
            w_vis=w_vis,
            map_ir=(w_ir * h).flatten(1),
            map_vis=(w_vis * h).flatten(1),
            sso_ir=sso_features(ir, scope, span),
            sso_vis=sso_features(vis, scope, span),
        )
