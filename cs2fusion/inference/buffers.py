"""Memory helpers of the fast path: the reused arena, channels-last views of flat buffers, pooling, denormals."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class Arena:
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
        return channels_last_view(self.take_flat(n * c * h * w), n, c, h, w)


def channels_last_view(flat: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """The first n·c·h·w elements of a flat buffer as a channels-last (n, c, h, w) tensor."""
    return flat[: n * c * h * w].view(n, h, w, c).permute(0, 3, 1, 2)


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (1, C, H, W) tensor as its (H·W, C) matrix, without a copy."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def pooled_max_sum(x: torch.Tensor, rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max and fp32 sum of a channels-last (1, C, H, W) tensor → two (1, C) fp32 tensors.

    Reduces row chunks widened to 16 pixels × C columns: much faster than reducing over (2, 3) when C is small
    or the dtype is bf16, and the fp32 sum stays exact enough for the DDM gates."""
    c = x.shape[1]
    maxes, sums = [], []
    for chunk in flat_rows(x).split(rows):
        chunk = chunk.float()
        if chunk.shape[0] % 16 == 0:
            chunk = chunk.view(-1, 16 * c)
        maxes.append(chunk.amax(0).view(-1, c).amax(0))
        sums.append(chunk.sum(0).view(-1, c).sum(0))
    return torch.stack(maxes).amax(0, keepdim=True), torch.stack(sums).sum(0, keepdim=True)


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Denormals as zero on CPU while in scope, restoring the caller's setting: real images produce denormals in
    the convs, and on some CPUs (measured on Sapphire Rapids) they slow oneDNN's direct convs down ten-fold.
    Values below 1e-38 do not reach the 0–255 output."""
    if device.type != "cpu" or denormals_flushed():
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def denormals_flushed() -> bool:
    """Whether this thread already treats denormals as zero (torch has no getter for the setting)."""
    return torch.tensor([1e-40]).mul(1.0).item() == 0.0
