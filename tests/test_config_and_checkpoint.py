"""Typed params, checkpoint metadata, and the library's independence from Ray / MLflow / DVC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cs2fusion.checkpoint import load_checkpoint, read_meta, save_checkpoint
from cs2fusion.config import ModelParams, ParamsError, load_params
from cs2fusion.io import InputError
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from tests.conftest import REPO


def test_shipped_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.model.input_scale == 255 and Path(REPO / params.train.init_from).is_file()
    # the demo fine-tunes the shipped model gently (README, quick start)
    assert (params.train.lr_backbone, params.train.lr_cpn) == (2e-5, 2e-4)


def test_params_reject_unknown_keys_and_wrong_types(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ParamsError, match="unknown key"):
        load_params(bad)
    bad.write_text("train:\n  epochs: three\n")
    with pytest.raises(ParamsError, match="train.epochs"):
        load_params(bad)
    bad.write_text("model:\n  norm_scope: global\n")
    with pytest.raises(ParamsError, match="norm_scope"):
        load_params(bad)
    for knob in ("ssim_weight", "max_weight", "grad_weight", "contrast_weight"):  # a negative weight trains away
        bad.write_text(f"train:\n  loss:\n    {knob}: -0.5\n")
        with pytest.raises(ParamsError, match=knob):
            load_params(bad)
    bad.write_text("train:\n  loss:\n    contrast_window: 4\n")  # an even box has no centre pixel
    with pytest.raises(ParamsError, match="contrast_window"):
        load_params(bad)
    bad.write_text("train:\n  loss:\n    target_gain: 0\n")  # a zero gain asks for a flat image
    with pytest.raises(ParamsError, match="target_gain"):
        load_params(bad)


def test_the_flat_layout_and_the_old_map_names_still_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Params files and checkpoints written before ``train.loss`` / ``scaling`` / ``tracking`` and ``map_spread``
    read as the same params; a key set both ways, or an old name with another spread, is refused."""
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("model: {map_norm: robust_sharp}\ntrain: {intensity: l1, max_weight: 2.0, num_workers: [1, 2],\n"
                   "        log_every: 3, tracking_patience_s: 5}\n")
    new.write_text("model: {map_norm: robust, map_spread: 0.5}\n"
                   "train: {loss: {intensity: l1, max_weight: 2.0}, scaling: {num_workers: [1, 2]},\n"
                   "        tracking: {log_every: 3, patience_s: 5}}\n")
    params = load_params(old)
    assert params == load_params(new)
    assert (params.model.map_norm, params.model.map_spread, params.train.loss.intensity) == ("robust", 0.5, "l1")
    assert params.train.scaling.worker_range == (1, 2) and params.train.tracking.patience_s == 5
    assert "train.num_workers: read as scaling.num_workers" in caplog.text
    for text, named in (("train: {intensity: l1, loss: {intensity: mse}}", "train.intensity: also set"),
                        ("model: {map_norm: robust_tight, map_spread: 0.5}", "means map_spread 1.0")):
        old.write_text(text + "\n")
        with pytest.raises(ParamsError, match=named):
            load_params(old)
    shipped = REPO / "cs2fusion/pretrained/roadscene.safetensors"  # as written before map_spread: robust_sharp
    meta = {**read_meta(shipped), "model": {"channels": 16, "input_scale": 255.0, "map_norm": "robust_sharp",
                                            "negative_slope": 0.01, "norm_scope": "batch"}}
    save_file(load_file(str(shipped)), str(tmp_path / "old.safetensors"), metadata={"cs2fusion": json.dumps(meta)})
    loaded = load_checkpoint(tmp_path / "old.safetensors")
    assert (loaded.backbone.params.map_norm, loaded.backbone.params.map_spread) == ("robust", 0.5)


def test_checkpoint_round_trip_with_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    params = ModelParams(norm_scope="batch")
    net, cpn = Backbone(params), CompensationPerceptionNetwork(params)
    meta = save_checkpoint(tmp_path / "m.safetensors", net, cpn, epoch=3)
    assert meta["branch_order"]["encoder_vis"].startswith("visible") and meta["epoch"] == 3
    loaded = load_checkpoint(tmp_path / "m.safetensors", with_cpn=True)
    assert loaded.backbone.params == params and loaded.meta == read_meta(tmp_path / "m.safetensors")
    for a, b in zip(net.state_dict().values(), loaded.backbone.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(cpn.state_dict().values(), loaded.cpn.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_with_foreign_metadata_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "m.safetensors", Backbone())
    tensors = load_file(str(tmp_path / "m.safetensors"))
    meta = read_meta(tmp_path / "m.safetensors")
    meta["branch_order"] = {"encoder_vis": "infrared", "encoder_ir": "visible"}
    save_file(tensors, str(tmp_path / "swapped.safetensors"), metadata={"cs2fusion": json.dumps(meta)})
    with pytest.raises(InputError, match="branch_order"):
        load_checkpoint(tmp_path / "swapped.safetensors")
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(InputError, match="without cs2fusion metadata"):
        load_checkpoint(tmp_path / "bare.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


def test_library_imports_without_ray_mlflow_dvc() -> None:
    script = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'ray', 'mlflow', 'dvc'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import cs2fusion
names = [m.name for m in pkgutil.walk_packages(cs2fusion.__path__, 'cs2fusion.') if m.name != 'cs2fusion.__main__']
for name in names:
    importlib.import_module(name)
print(len(names))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) >= 15
