"""Training loop without Ray: losses fall on real patches, and a resumed state continues bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cs2fusion.config import ModelParams, ShardParams, TrainParams, build, Params
from cs2fusion.data.shards import TrainShards, set_shards, write_shards
from cs2fusion.training import build_state, load_optim_state, optim_state, run_epoch, train_step
from tests.tiny import TINY

pytestmark = pytest.mark.data  # real pairs from ../shared

TRAIN = TrainParams(batch_size=4, lr_backbone=2e-3)


def _batches(tmp: Path, manifest: dict) -> list:
    params = build(Params, TINY)
    shard = ShardParams(**{**params.shard.__dict__, "patch_size": 48, "max_patches_per_image": 4})
    write_shards(manifest, shard, tmp)
    ds = TrainShards(set_shards(tmp, "train"), seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, drop_last=True)
    return [tuple(t for t in b[1:]) for b in loader]


def _manifest() -> dict:
    from cs2fusion.data.manifest import build_manifest

    return build_manifest(build(Params, TINY).prepare)


def test_losses_fall_on_real_patches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batches = _batches(tmp_path, _manifest())
    state = build_state(ModelParams(), TRAIN)
    history = [train_step(state, batches[k % len(batches)], TRAIN) for k in range(12)]
    first = sum(h["loss/backbone"] for h in history[:3]) / 3
    last = sum(h["loss/backbone"] for h in history[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert all(torch.isfinite(torch.tensor(h["loss/cpn"])) for h in history)


def test_resume_is_exact(tmp_path: Path) -> None:
    batches = _batches(tmp_path, _manifest())[:4]
    loader = [("k", *b) for b in batches]

    torch.manual_seed(0)
    a = build_state(ModelParams(), TRAIN)
    run_epoch(a, loader[:2], TRAIN, steps=2)
    torch.save(optim_state(a), tmp_path / "state.pt")
    saved = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in
             (("backbone", a.backbone), ("cpn", a.cpn))}
    run_epoch(a, loader[2:], TRAIN, steps=2)

    torch.manual_seed(1)  # different init, all of it overwritten by the checkpoint
    b = build_state(ModelParams(), TRAIN)
    b.backbone.load_state_dict(saved["backbone"])
    b.cpn.load_state_dict(saved["cpn"])
    load_optim_state(b, torch.load(tmp_path / "state.pt", weights_only=True))
    assert (b.epoch, b.step) == (1, 2)
    run_epoch(b, loader[2:], TRAIN, steps=2)
    for x, y in zip(a.backbone.parameters(), b.backbone.parameters()):
        assert torch.equal(x, y)
    for x, y in zip(a.cpn.parameters(), b.cpn.parameters()):
        assert torch.equal(x, y)
    assert a.sched_backbone.get_last_lr() == b.sched_backbone.get_last_lr()
    assert json.dumps(a.opt_cpn.state_dict()["param_groups"]) == json.dumps(b.opt_cpn.state_dict()["param_groups"])
