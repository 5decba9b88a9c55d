"""The image API: :class:`Fuser` fuses pairs with one backbone, through the fast graph or the model's own forward.

The network fuses luminance only; a colour visible image gives its Cb/Cr back to the fused Y (BT.601 full range),
a grey one gives a grey output. Output pixels are clipped and truncated to uint8 as the release does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import torch

from cs2fusion.color import rgb_to_ycbcr_bt601_full, to_uint8, ycbcr_to_rgb_bt601_full
from cs2fusion.inference.graph import InferenceGraph
from cs2fusion.io import InputError
from cs2fusion.model import Backbone

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``auto`` → the GPU where one is visible, else the CPU; ``cuda`` without a GPU raises InputError."""
    if device not in DEVICES:
        raise InputError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device cuda: no CUDA GPU is visible to torch {torch.__version__}")
    return torch.device(device)


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    """How to run inference. ``fast``: the inference graph (else the model's own forward, fp32 only: the
    reference the tests compare to); ``tile`` > 0 runs exact tiles of that size once an image exceeds
    ``max_pixels``; ``winograd``: the CPU head (fp32, bf16) as the compiled Winograd kernel where it applies
    (direct convs otherwise)."""

    precision: Literal["fp32", "bf16"] = "fp32"
    fast: bool = True
    winograd: bool = True
    tile: int = 512
    max_pixels: int = 4_000_000

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        if not self.fast and self.precision != "fp32":
            raise ValueError("the model's own forward (fast=False) runs in fp32 only")


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
        # The network sees pixels/255 × input_scale (Backbone.forward's contract: [0, 1] in, scaled inside); the
        # graph takes the network's own input scale, so 0–255 pixels are multiplied by input_scale/255 for it.
        self.to_net = float(backbone.params.input_scale) / 255.0
        dtype = PRECISIONS[options.precision]
        self.graph = InferenceGraph(self.backbone, dtype=dtype, winograd=options.winograd) if options.fast else None

    @torch.inference_mode()
    def fuse_y_batch(self, vis_y: list[np.ndarray], ir: list[np.ndarray]) -> list[np.ndarray]:
        """Same-size (H, W) float 0–255 arrays → fused Y float32 (H, W) each, on the 0–255 scale."""
        if len({a.shape for a in (*vis_y, *ir)}) != 1:
            raise InputError(f"a batch needs one size, got {sorted({a.shape for a in (*vis_y, *ir)})}")
        v = _as_batch(vis_y, "vis_y").to(self.device)
        i = _as_batch(ir, "ir").to(self.device)
        h, w = v.shape[2:]
        if self.graph is None:
            out = self.backbone(vis_y=v / 255.0, ir=i / 255.0).fused * 255.0
        else:
            tiled = self.options.tile and h * w > self.options.max_pixels
            if self.to_net != 1.0:
                v, i = v * self.to_net, i * self.to_net
            out = self.graph(v, i, tile=self.options.tile if tiled else 0)
            if self.to_net != 1.0:
                out = out / self.to_net
        return list(out.float().cpu().numpy()[:, 0])

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

    def fuse_stack(self, *, vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        """The served layout: vis uint8 (N, H, W, 1|3), ir uint8 (N, H, W) → fused uint8 (N, H, W, 1|3), each pair
        as :meth:`fuse`; another shape raises InputError in one line."""
        check_stack(vis=vis, ir=ir)
        out = []
        for v, i in zip(vis, ir):
            fused = self.fuse(vis=v if v.shape[2] == 3 else v[:, :, 0], ir=i)
            out.append(fused if fused.ndim == 3 else fused[:, :, None])
        return np.stack(out)


def check_stack(*, vis: np.ndarray, ir: np.ndarray) -> None:
    """ir (N, H, W) and vis (N, H, W, 1|3) of the same N, H, W, else InputError in one line."""
    if ir.ndim != 3 or vis.ndim != 4:
        raise InputError(f"expected ir (N, H, W) and vi (N, H, W, 1|3), got ir {ir.shape} and vi {vis.shape}")
    if vis.shape[3] not in (1, 3):
        raise InputError(f"vi has {vis.shape[3]} channels: send grey (1) or RGB (3), without alpha")
    if vis.shape[:3] != ir.shape:
        raise InputError(f"ir {ir.shape} and vi {vis.shape[:3]} differ: each pair must have one size")
