"""The fast path's 3×3 conv: in place through oneDNN's sum post-op on CPU where this torch build has it,
``F.conv2d`` otherwise (GPUs, other builds)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CL = torch.channels_last


@functools.cache
def onednn_inplace_conv(dtype: torch.dtype) -> bool:
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


class Conv3x3:
    """``out`` (+)= conv3x3(x, w) + b in place, then LeakyReLU; ``onednn`` says which implementation runs."""

    def __init__(self, device: torch.device, dtype: torch.dtype, slope: float) -> None:
        self.onednn = device.type == "cpu" and onednn_inplace_conv(dtype)
        self.slope = slope

    def __call__(self, out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *,
                 accumulate: bool = False, act: bool = True) -> torch.Tensor:
        if self.onednn:
            if not accumulate:
                out.zero_()
            torch.ops.mkldnn._convolution_pointwise_.binary(
                out, x, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, None, [], None)
        else:
            y = F.conv2d(x, w, b, padding=1)
            out.add_(y) if accumulate else out.copy_(y)
        return F.leaky_relu_(out, self.slope) if act else out


def prepared(conv: torch.nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A conv's weight (channels-last) and bias, detached, in ``dtype``."""
    return conv.weight.detach().to(dtype).contiguous(memory_format=CL), conv.bias.detach().to(dtype)
