"""The one door for the published CS2Fusion weights: an explicit key table from the release's names to ours.

The release files are plain state_dicts (``torch.load(..., weights_only=True)``, never a pickle fallback).
Every key must be mapped and every shape must match; ``module.`` / ``_orig_mod.`` prefixes are stripped.
"""

from __future__ import annotations

from pathlib import Path

import torch

_ENCODER = {"con1": "conv1", "con2": "conv2", "con3": "conv3", "con4": "conv4"}

BACKBONE_KEYS: dict[str, str] = {
    **{f"{old}.0": f"encoder_vis.{new}" for old, new in _ENCODER.items()},
    **{f"{old}_1.0": f"encoder_ir.{new}" for old, new in _ENCODER.items()},
    **{f"decon{i + 1}.0": f"decoder.{i}" for i in range(4)},
    **{f"cov{i + 1}.0": f"ddm.{i}.query" for i in range(3)},
    **{f"ca{i + 1}.cov.0": f"ddm.{i}.gate" for i in range(3)},
}

CPN_KEYS: dict[str, str] = {"conv.0": "conv", "activation.0": "estimator"}


class WeightsError(ValueError):
    """Weights that do not fit the architecture."""


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def remap(state: dict[str, torch.Tensor], table: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    """Renames ``<old>.weight|bias`` to ``<new>.weight|bias``; unknown or missing keys raise."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = _strip(key).rpartition(".")
        if module not in table or leaf not in ("weight", "bias"):
            raise WeightsError(f"{source}: unexpected key {key!r}")
        out[f"{table[module]}.{leaf}"] = value
    expected = 2 * len(table)
    if len(out) != expected:
        raise WeightsError(f"{source}: {len(out)} tensors, expected {expected}")
    return out


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads a remapped state strictly, naming the first shape mismatch."""
    own = module.state_dict()
    for key, value in state.items():
        if key not in own:
            raise WeightsError(f"{source}: {key!r} has no place in {type(module).__name__}")
        if own[key].shape != value.shape:
            raise WeightsError(f"{source}: {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    module.load_state_dict(state, strict=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from disk, tensors only (``weights_only=True``)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a plain state_dict of tensors")
    return state


def load_published_backbone(module: torch.nn.Module, path: str | Path) -> None:
    """Fills a :class:`~cs2fusion.model.Backbone` from the release's ``backbone.pt`` (or ``pretrain-backbone.pt``)."""
    load_into(module, remap(read_state_dict(path), BACKBONE_KEYS, str(path)), str(path))


def load_published_cpn(module: torch.nn.Module, path: str | Path) -> None:
    """Fills a :class:`~cs2fusion.model.CompensationPerceptionNetwork` from the release's ``cpn.pt``."""
    load_into(module, remap(read_state_dict(path), CPN_KEYS, str(path)), str(path))
