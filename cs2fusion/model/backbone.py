"""The CS2Fusion backbone: two dense encoders and a decoder with the demand-driven module (paper §3.2).

Tensors are float, (N, 1, H, W), in [0, 1]; the published weights work on a 0–255 scale, which is
``ModelParams.input_scale`` applied inside :meth:`Backbone.forward` (in and out). Any H×W works.
Branch A (``encoder_vis``) takes the visible luminance Y, branch B (``encoder_ir``) the infrared image, as in
the released test path; the arguments are keyword-only so the two can never be swapped silently.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cs2fusion.config import ModelParams


class EncoderFeatures(NamedTuple):
    """The four dense-encoder levels e1..e4, each (N, C, H, W), on the model's internal 0–255 scale."""

    e1: torch.Tensor
    e2: torch.Tensor
    e3: torch.Tensor
    e4: torch.Tensor

    def stacked(self) -> torch.Tensor:
        """[e4, e3, e2, e1] concatenated on channels, (N, 4C, H, W): the encoder output of the paper."""
        return torch.cat([self.e4, self.e3, self.e2, self.e1], dim=1)


class BackboneOutput(NamedTuple):
    """Fused Y in [0, 1] (not clamped) and both encoders' features (for the CPN)."""

    fused: torch.Tensor
    vis: EncoderFeatures
    ir: EncoderFeatures


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=True)


class DenseEncoder(nn.Module):
    """Four 3×3 conv layers with dense connections: e3 sees [e2, e1], e4 sees [e3, e2, e1]."""

    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        c = channels
        self.conv1 = conv3x3(1, c)
        self.conv2 = conv3x3(c, c)
        self.conv3 = conv3x3(2 * c, c)
        self.conv4 = conv3x3(3 * c, c)
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        act = lambda t: F.leaky_relu(t, self.negative_slope)  # noqa: E731
        e1 = act(self.conv1(x))
        e2 = act(self.conv2(e1))
        e3 = act(self.conv3(torch.cat([e2, e1], dim=1)))
        e4 = act(self.conv4(torch.cat([e3, e2, e1], dim=1)))
        return EncoderFeatures(e1, e2, e3, e4)


class DemandDrivenModule(nn.Module):
    """DDM: a per-image gate from the decoder state scales a query of the (detached) encoder features.

    gate = sigmoid(linear([global max(d), global mean(d)])) — one scalar per image (the released 3×3 conv on
    a 1×1 map only uses its centre tap, which is what :meth:`gate_from_pools` computes);
    query = act(conv(F_vis)) + act(conv(F_ir)) with one shared conv.
    """

    def __init__(self, dec_channels: int, enc_channels: int, out_channels: int, negative_slope: float) -> None:
        super().__init__()
        self.query = conv3x3(enc_channels, out_channels)
        self.gate = conv3x3(2 * dec_channels, 1)
        self.negative_slope = negative_slope

    def gate_from_pools(self, pooled_max: torch.Tensor, pooled_mean: torch.Tensor) -> torch.Tensor:
        """(N, C) max and mean of the decoder state → gate (N, 1, 1, 1)."""
        pooled = torch.cat([pooled_max, pooled_mean], dim=1)
        logits = F.linear(pooled, self.gate.weight[:, :, 1, 1], self.gate.bias)
        return torch.sigmoid(logits)[:, :, None, None]

    def gate_of(self, d: torch.Tensor) -> torch.Tensor:
        """Gate of a whole decoder state d (N, C, H, W)."""
        return self.gate_from_pools(d.amax(dim=(2, 3)), d.mean(dim=(2, 3)))

    def query_of(self, f_vis: torch.Tensor, f_ir: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, self.negative_slope)  # noqa: E731
        return act(self.query(f_vis)) + act(self.query(f_ir))


class Backbone(nn.Module):
    """Two dense encoders + a four-layer decoder with three DDMs (the published ``AutoEncoder``)."""

    def __init__(self, params: ModelParams = ModelParams()) -> None:
        super().__init__()
        c = params.channels
        slope = params.negative_slope
        self.params = params
        self.encoder_vis = DenseEncoder(c, slope)
        self.encoder_ir = DenseEncoder(c, slope)
        enc = 4 * c
        self.decoder = nn.ModuleList([conv3x3(2 * enc, 4 * c), conv3x3(4 * c, 2 * c), conv3x3(2 * c, c), conv3x3(c, 1)])
        self.ddm = nn.ModuleList(
            [
                DemandDrivenModule(4 * c, enc, 4 * c, slope),
                DemandDrivenModule(2 * c, enc, 2 * c, slope),
                DemandDrivenModule(c, enc, c, slope),
            ]
        )

    def encode(self, vis_y: torch.Tensor, ir: torch.Tensor) -> tuple[EncoderFeatures, EncoderFeatures]:
        """Both encoders on 0–255-scale inputs."""
        return self.encoder_vis(vis_y), self.encoder_ir(ir)

    def decoder_layer(self, level: int, x: torch.Tensor) -> torch.Tensor:
        """Decoder conv ``level`` (0..3); layers 0..2 are followed by the activation, the last is linear."""
        y = self.decoder[level](x)
        return y if level == 3 else F.leaky_relu(y, self.params.negative_slope)

    def decode(self, f_vis: torch.Tensor, f_ir: torch.Tensor) -> torch.Tensor:
        """Decoder with DDM on the stacked encoder features (N, 64, H, W) each → fused (0–255 scale)."""
        x = torch.cat([f_vis, f_ir], dim=1)
        q_vis, q_ir = f_vis.detach(), f_ir.detach()
        for level, ddm in enumerate(self.ddm):
            d = self.decoder_layer(level, x)
            x = d + ddm.gate_of(d) * ddm.query_of(q_vis, q_ir)
        return self.decoder_layer(3, x)

    def forward(self, *, vis_y: torch.Tensor, ir: torch.Tensor) -> BackboneOutput:
        """vis_y, ir: (N, 1, H, W) float in [0, 1] → fused Y in [0, 1] plus encoder features."""
        s = self.params.input_scale
        feats_vis, feats_ir = self.encode(vis_y * s, ir * s)
        fused = self.decode(feats_vis.stacked(), feats_ir.stacked())
        return BackboneOutput(fused / s, feats_vis, feats_ir)
