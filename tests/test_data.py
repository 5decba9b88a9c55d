"""Data stages on real pairs: layouts, validation, splits, deterministic shards, rank/worker coverage."""

from __future__ import annotations

import dataclasses

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cs2fusion.config import DatasetSpec, PrepareParams, ShardParams
from cs2fusion.data.layouts import detect_layout, discover
from cs2fusion.data.manifest import build_manifest, select
from cs2fusion.data.shards import TrainShards, epoch_plan, iter_eval, read_index, set_files, set_shards, write_shards
from cs2fusion.io import InputError, read_image
from tests.conftest import DATA

pytestmark = pytest.mark.data  # real pairs from ../shared

RS = DATA / "roadscene"
IDS = sorted(p.stem for p in (RS / "ir").glob("*.png"))[:6]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def _native(tmp: Path, layout: str) -> Path:
    """The real RoadScene files re-laid out as data set ``layout`` ships them."""
    root = tmp / layout
    folders = {
        "roadscene": {None: ("cropinfrared", "crop_LR_visible")},
        "msrs": {"train": ("train/ir", "train/vi"), "test": ("test/ir", "test/vi")},
        "llvip": {"train": ("infrared/train", "visible/train"), "test": ("infrared/test", "visible/test")},
        "m3fd": {None: ("Ir", "Vis")},
    }[layout]
    for k, i in enumerate(IDS):
        split = "train" if k < 4 else "test"
        ir_dir, vi_dir = folders.get(split) or folders[None]
        _link(RS / "ir" / f"{i}.png", root / ir_dir / f"{i}.png")
        _link(RS / "vi" / f"{i}.png", root / vi_dir / f"{i}.png")
    return root


@pytest.mark.parametrize("layout", ["roadscene", "msrs", "llvip", "m3fd"])
def test_native_layouts_detected(layout: str, tmp_path: Path) -> None:
    root = _native(tmp_path, layout)
    assert detect_layout(root).name == layout
    pairs, problems = discover(root)
    assert sorted(p.id for _, p in pairs) == IDS and not problems
    native = {p.id: s for s, p in pairs}
    if layout in ("msrs", "llvip"):
        assert [native[i] for i in IDS] == ["train"] * 4 + ["test"] * 2


def test_ir_vi_layout_on_shared_sets() -> None:
    for name in ("roadscene", "tno40", "tno25", "cs2fusion_roadscene40"):
        assert detect_layout(DATA / name).name == "ir-vi"


def test_ambiguous_and_unknown_layouts(tmp_path: Path) -> None:
    root = _native(tmp_path, "roadscene")
    shutil.copytree(root / "cropinfrared", root / "ir", symlinks=True)
    shutil.copytree(root / "crop_LR_visible", root / "vi", symlinks=True)
    with pytest.raises(InputError, match="ambiguous"):
        detect_layout(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no known layout"):
        detect_layout(tmp_path / "empty")


def test_paper_split_from_list_files() -> None:
    spec = DatasetSpec(name="rs", root=str(RS), lists={"train": str(RS / "splits/auif_train180.txt"),
                                                       "test": str(RS / "splits/auif_test40.txt")})
    manifest = build_manifest(PrepareParams(datasets=(spec,)))
    assert manifest["datasets"]["rs"]["splits"] == {"test": 40, "train": 180, "unused": 1}
    test_ids = {e["id"] for e in select(manifest, "rs/test")}
    assert not test_ids & {e["id"] for e in select(manifest, "rs/train")}
    entry = next(e for e in select(manifest, "rs/test") if e["id"] == "FLIR_00977")  # id 1 of the 40
    assert entry["vi_mode"] == "RGB" and len(entry["ir_sha256"]) == 64


def _small_copy(tmp: Path, ids: list[str] = IDS) -> Path:
    root = tmp / "small"
    for kind in ("ir", "vi"):
        (root / kind).mkdir(parents=True)
        for i in ids:
            shutil.copy(RS / kind / f"{i}.png", root / kind / f"{i}.png")
    return root


def test_bad_pairs_strict_lists_all_and_skip_drops(tmp_path: Path) -> None:
    root = _small_copy(tmp_path)
    (root / "ir" / f"{IDS[1]}.png").write_bytes(b"garbage")
    Image.open(root / "vi" / f"{IDS[2]}.png").crop((0, 0, 50, 40)).save(root / "vi" / f"{IDS[2]}.png")
    (root / "vi" / f"{IDS[3]}.png").unlink()
    spec = DatasetSpec(name="small", root=str(root))
    with pytest.raises(InputError) as err:
        build_manifest(PrepareParams(datasets=(spec,)))
    text = str(err.value)
    assert "3 bad pair" in text
    for named in (f"ir/{IDS[1]}.png", f"vi/{IDS[2]}.png", f"ir/{IDS[3]}.png"):
        assert named in text, named
    manifest = build_manifest(PrepareParams(datasets=(spec,), policy="skip"))
    kept = [e["id"] for e in manifest["datasets"]["small"]["pairs"]]
    assert kept == [IDS[0], IDS[4], IDS[5]]
    assert len(manifest["datasets"]["small"]["rejected"]) == 3


def test_ratio_split_is_seeded() -> None:
    spec = DatasetSpec(name="t", root=str(DATA / "tno40"), ratio={"train": 0.75, "test": 0.25}, seed=3)
    a = build_manifest(PrepareParams(datasets=(spec,)))
    b = build_manifest(PrepareParams(datasets=(spec,)))
    assert a == b and a["datasets"]["t"]["splits"] == {"test": 10, "train": 30}


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = _small_copy(tmp_path_factory.mktemp("rs"))
    spec = DatasetSpec(name="rs", root=str(root), ratio={"train": 4, "test": 2})
    return build_manifest(PrepareParams(datasets=(spec,)))


SHARD_PARAMS = ShardParams(train=("rs/train",), eval=("rs/test",), patch_size=64, stride=48,
                           max_samples_per_shard=40, shard_multiple=4)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_shards_are_deterministic_and_indexed(small_manifest: dict, tmp_path: Path) -> None:
    write_shards(small_manifest, SHARD_PARAMS, tmp_path / "a")
    write_shards(small_manifest, SHARD_PARAMS, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    index = read_index(tmp_path / "a")
    train = index["sets"]["train"]
    assert len(train["shards"]) % 4 == 0
    sizes = [s["samples"] for s in train["shards"]]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == train["samples"] and max(sizes) <= 40
    for s in train["shards"]:
        assert hashlib.sha256((tmp_path / "a" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp leftovers


def test_eval_shards_round_trip_pixels(small_manifest: dict, tmp_path: Path) -> None:
    write_shards(small_manifest, SHARD_PARAMS, tmp_path)
    seen = []
    for meta, ir, vi in iter_eval(set_files(tmp_path, "rs/test")):
        entry = next(e for e in select(small_manifest, "rs/test") if e["id"] == meta["id"])
        assert np.array_equal(ir, read_image(entry["ir"])) and np.array_equal(vi, read_image(entry["vi"]))
        seen.append(meta["id"])
    assert sorted(seen) == sorted(e["id"] for e in select(small_manifest, "rs/test"))


def test_epoch_plan_splits_samples_for_any_cluster_shape() -> None:
    """Sample ranges, not whole shards: 24 samples in 4 uneven shards over 3 ranks × 2 loader workers (local batch
    2) are read once each, every rank gets 4 steps; with 25 samples one waits for another epoch."""
    for counts, left_out in (([5, 7, 6, 6], 0), ([5, 7, 6, 7], 1)):
        for epoch in (0, 1):
            plan = epoch_plan(counts, world_size=3, loader_workers=2, local_batch=2, seed=3, epoch=epoch)
            read = [(shard, k) for rank in plan for worker in rank for shard, first, end in worker
                    for k in range(first, end)]
            assert len(read) == len(set(read)) == sum(counts) - left_out  # disjoint; complete but the remainder
            for rank in plan:
                sizes = [sum(end - first for _, first, end in worker) for worker in rank]
                assert sum(sizes) == 8 and all(size % 2 == 0 for size in sizes)  # 4 whole local batches per rank
    one_shard = epoch_plan([10], world_size=4, loader_workers=3, local_batch=1, seed=0, epoch=0)
    assert [sum(e - f for w in rank for _, f, e in w) for rank in one_shard] == [2, 2, 2, 2]  # 12 readers, 1 shard


def test_reader_3_ranks_2_loader_workers_4_shards(small_manifest: dict, tmp_path: Path) -> None:
    """The real reader through DataLoader workers: disjoint across every rank and worker, complete up to the
    remainder, the same number of batches on every rank."""
    write_shards(small_manifest, dataclasses.replace(SHARD_PARAMS, max_samples_per_shard=10_000), tmp_path)
    shards = set_shards(tmp_path, "train")
    total = read_index(tmp_path)["sets"]["train"]["samples"]
    assert len(shards) == 4
    for epoch in (0, 1):
        keys, batches = [], []
        for rank in range(3):
            ds = TrainShards(shards, local_batch=3, rank=rank, world_size=3, seed=5)
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, drop_last=True)
            count = 0
            for key, ir, vi, vi_imp in loader:
                assert ir.shape == vi.shape == vi_imp.shape == (3, 1, 64, 64)
                assert 0 <= float(ir.min()) and float(ir.max()) <= 1
                keys += key
                count += 1
            assert count == ds.steps()
            batches.append(count)
        assert len(set(batches)) == 1 and len(keys) == len(set(keys))
        assert 0 <= total - len(keys) < 3 * 3


def test_impaired_view_seeded_per_sample_and_epoch(small_manifest: dict, tmp_path: Path) -> None:
    write_shards(small_manifest, SHARD_PARAMS, tmp_path)
    shards = set_shards(tmp_path, "train")
    views = {}
    for epoch in (0, 0, 1):
        ds = TrainShards(shards, world_size=1, seed=1)
        ds.set_epoch(epoch)
        views.setdefault(epoch, []).append({k: v for k, _, _, v in ds})
    first, again = views[0]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], views[1][0][k]) for k in first)


def test_manifest_is_json_serialisable(small_manifest: dict) -> None:
    assert json.loads(json.dumps(small_manifest)) == small_manifest


def test_eval_set_overlapping_training_is_refused(small_manifest: dict, tmp_path: Path) -> None:
    leaky = ShardParams(train=("rs/train",), eval=("rs",), patch_size=64, stride=48)
    with pytest.raises(InputError, match="contains training pair"):
        write_shards(small_manifest, leaky, tmp_path / "s")
    assert not (tmp_path / "s").exists()
