"""Fusion of image pairs with a trained backbone: Y-channel fusion and the colour round trip.

The network fuses luminance only; a colour visible image gives its Cb/Cr back to the fused Y (BT.601 full
range), a grey one gives a grey output. Output pixels are clipped and truncated to uint8 as the release does.
"""

from __future__ import annotations

import numpy as np
import torch

from cs2fusion.color import rgb_to_ycbcr_bt601_full, to_uint8, ycbcr_to_rgb_bt601_full
from cs2fusion.io import InputError
from cs2fusion.model import Backbone


def _as_tensor(array: np.ndarray, name: str, device: torch.device) -> torch.Tensor:
    if array.ndim != 2:
        raise InputError(f"{name}: expected a (H, W) array, got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)


class Fuser:
    """Fuses pairs with one backbone in eval mode; ``fuse_y`` is the float core, ``fuse`` the image API."""

    def __init__(self, backbone: Backbone, *, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.scale = float(backbone.params.input_scale)

    @torch.inference_mode()
    def fuse_y(self, *, vis_y: np.ndarray, ir: np.ndarray) -> np.ndarray:
        """vis_y, ir: (H, W) float 0–255 → fused Y, float32 (H, W) on the same 0–255 scale."""
        if vis_y.shape != ir.shape:
            raise InputError(f"visible {vis_y.shape} and infrared {ir.shape} differ in size")
        out = self.backbone(
            vis_y=_as_tensor(vis_y, "vis_y", self.device) / self.scale,
            ir=_as_tensor(ir, "ir", self.device) / self.scale,
        ).fused
        return (out[0, 0].float() * self.scale).cpu().numpy()

    def fuse(self, *, vis: np.ndarray, ir: np.ndarray) -> np.ndarray:
        """vis: uint8 (H, W) or (H, W, 3); ir: uint8 (H, W) → fused uint8 image, colour if ``vis`` is."""
        if vis.ndim == 3:
            y, cb, cr = rgb_to_ycbcr_bt601_full(vis)
            return to_uint8(ycbcr_to_rgb_bt601_full(self.fuse_y(vis_y=y, ir=ir), cb, cr))
        return to_uint8(self.fuse_y(vis_y=vis.astype(np.float32), ir=ir))
