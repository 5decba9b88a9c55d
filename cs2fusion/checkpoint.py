"""Model checkpoints: safetensors tensors + JSON metadata, so loading is unambiguous and never unpickles.

The metadata names the format and architecture versions, the model params, the input range and the branch
order; a file whose metadata does not match what this code implements is refused, never guessed at.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cs2fusion.config import ModelParams, ParamsError, build
from cs2fusion.io import InputError, atomic_path
from cs2fusion.model import Backbone, CompensationPerceptionNetwork

FORMAT = "cs2fusion.checkpoint"
FORMAT_VERSION = 1
ARCHITECTURE = "cs2fusion-backbone-v1"
INPUT_RANGE = "float [0, 1] per channel (scaled by model.input_scale inside the network)"
OUTPUT = "fused luminance Y, float [0, 1], not clamped"
BRANCH_ORDER = {"encoder_vis": "visible luminance Y (BT.601 full range)", "encoder_ir": "infrared, grey"}
CPN_INPUT_ORDER = ["infrared features", "visible features"]


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the backbone (eval mode), the CPN if stored, and the metadata."""

    backbone: Backbone
    cpn: CompensationPerceptionNetwork | None
    meta: dict[str, Any]


def make_meta(params: ModelParams, **extra: Any) -> dict[str, Any]:
    """The metadata block every checkpoint carries; ``extra`` adds provenance (source, epoch, commit…)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "model": dataclasses.asdict(params),
        "input_range": INPUT_RANGE,
        "output": OUTPUT,
        "branch_order": BRANCH_ORDER,
        "cpn_input_order": CPN_INPUT_ORDER,
        "torch_version": torch.__version__,
        **extra,
    }


def save_checkpoint(
    path: str | Path, backbone: Backbone, cpn: CompensationPerceptionNetwork | None = None, **extra: Any
) -> dict[str, Any]:
    """Writes backbone (and CPN) weights with metadata to ``path`` atomically; returns the metadata."""
    meta = make_meta(backbone.params, has_cpn=cpn is not None, **extra)
    tensors = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    if cpn is not None:
        tensors.update({f"cpn.{k}": v.detach().cpu().contiguous() for k, v in cpn.state_dict().items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cs2fusion": json.dumps(meta, sort_keys=True)})
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """Only the metadata of a checkpoint (cheap: reads the safetensors header)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("cs2fusion")
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a cs2fusion checkpoint ({err})") from None
    if raw is None:
        raise InputError(f"{path}: safetensors file without cs2fusion metadata")
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise InputError(f"{path}: cs2fusion metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise InputError(f"{path}: cs2fusion metadata without its model block")
    checks = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": ARCHITECTURE,
        "branch_order": BRANCH_ORDER,
    }
    for key, want in checks.items():
        if meta.get(key) != want:
            raise InputError(f"{path}: metadata {key}={meta.get(key)!r}, this version reads {want!r}")
    return meta


def load_checkpoint(path: str | Path, *, with_cpn: bool = False) -> Checkpoint:
    """Builds the networks from a checkpoint's metadata and fills them strictly."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint")
    meta = read_meta(path)
    try:
        params = build(ModelParams, meta["model"], where=f"{path}: model")
    except ParamsError as err:
        raise InputError(str(err)) from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: unreadable tensors ({err})") from None
    backbone = _filled(Backbone(params), tensors, "backbone.", path)
    backbone.eval()
    cpn = None
    if with_cpn:
        if not meta.get("has_cpn"):
            raise InputError(f"{path}: holds no CPN weights")
        cpn = _filled(CompensationPerceptionNetwork(params), tensors, "cpn.", path)
    return Checkpoint(backbone, cpn, meta)


def _filled(net: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, path: Path) -> Any:
    """``net`` with the ``prefix`` tensors loaded strictly: every name, shape and dtype as built, all finite."""
    section = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = net.state_dict()
    missing, extra = sorted(set(expected) - set(section)), sorted(set(section) - set(expected))
    if missing or extra:
        raise InputError(f"{path}: {prefix.rstrip('.')} tensors do not match the architecture in its metadata "
                         f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, unexpected "
                         f"{extra[:3]}{'…' if len(extra) > 3 else ''})")
    for name, want in expected.items():
        got = section[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise InputError(f"{path}: tensor {prefix}{name} is {got.dtype} {tuple(got.shape)}, the architecture in "
                             f"its metadata needs {want.dtype} {tuple(want.shape)}")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise InputError(f"{path}: tensor {prefix}{name} holds NaN or infinite values")
    net.load_state_dict(section, strict=True)
    return net
