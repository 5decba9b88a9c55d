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
from cs2fusion.data.shards import TrainShards, epoch_order, iter_eval, read_index, set_files, set_shards, write_shards
from cs2fusion.io import InputError, read_image
from cs2fusion.span import split_batch
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
    for name in ("roadscene", "tno40", "tno25", "cs2fusion_roadscene40", "msrs"):
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


def test_epoch_order_is_the_same_for_any_cluster_shape() -> None:
    """25 samples in 4 uneven shards, global batch 4: the order is a permutation of the samples (one left for
    another epoch), other per epoch, and every (ranks, loader workers) shape reads each global batch's positions
    once, rank r its part r (3 ranks: 2, 1 and 1 samples), worker w the batches w, w + workers, …"""
    counts = [5, 7, 6, 7]
    orders = [epoch_order(counts, seed=3, epoch=epoch, window=8) for epoch in (0, 1)]
    for order in orders:
        assert sorted(order.order.tolist()) == list(range(25))
        assert all(set(order.order[k:k + 8].tolist()) == set(range(k, min(k + 8, 25))) for k in range(0, 25, 8))
    assert orders[0].order.tolist() != orders[1].order.tolist()
    for world, workers in ((1, 1), (2, 3), (3, 2), (4, 2)):
        batches: dict[int, list[int]] = {}
        firsts = np.cumsum([0, *split_batch(4, world)])
        for rank in range(world):
            for worker in range(workers):
                positions = orders[0].positions(batch_size=4, world_size=world, rank=rank, worker=worker,
                                                workers=workers)
                for p in positions.tolist():
                    batch, part = divmod(p, 4)
                    assert batch % workers == worker and firsts[rank] <= part < firsts[rank + 1]
                    batches.setdefault(batch, []).append(p)
        assert sorted(batches) == list(range(6)) and all(sorted(v) == list(range(4 * b, 4 * b + 4))
                                                         for b, v in batches.items())


def test_global_batches_do_not_depend_on_ranks_or_loader_workers(small_manifest: dict, tmp_path: Path) -> None:
    """The real reader through DataLoader workers: 1 rank × 0 loader workers, 2 × 2, 3 × 1 and 4 × 1 (global batch
    4) give the same global batches, samples and impaired views, step by step, in two epochs; each sample once."""
    write_shards(small_manifest, dataclasses.replace(SHARD_PARAMS, max_samples_per_shard=100), tmp_path)
    shards = set_shards(tmp_path, "train")
    total = read_index(tmp_path)["sets"]["train"]["samples"]
    assert len(shards) == 4 and total % 4  # uneven shards, a remainder

    def global_batches(world: int, workers: int, epoch: int) -> list[tuple[list[str], torch.Tensor]]:
        per_rank = []
        for rank in range(world):
            ds = TrainShards(shards, batch_size=4, rank=rank, world_size=world, seed=5, shuffle_buffer=16)
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=ds.local_batch, num_workers=workers, drop_last=True)
            per_rank.append(list(loader))
            assert len(per_rank[-1]) == ds.steps() == total // 4
        return [(sum((list(r[k][0]) for r in per_rank), []), torch.cat([r[k][3] for r in per_rank]))
                for k in range(len(per_rank[0]))]

    for epoch in (0, 1):
        reference = global_batches(1, 0, epoch)
        keys = [key for batch, _ in reference for key in batch]
        assert len(keys) == len(set(keys)) and 0 <= total - len(keys) < 4
        for world, workers in ((2, 2), (3, 1), (4, 1)):  # 3: parts of 2, 1 and 1 samples
            other = global_batches(world, workers, epoch)
            assert [b for b, _ in other] == [b for b, _ in reference], (world, workers)
            assert all(torch.equal(v, w) for (_, v), (_, w) in zip(other, reference))


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


def test_two_sensors_mix_in_training_with_a_cap_per_set_and_validate_as_one_union(tmp_path: Path) -> None:
    """RoadScene + MSRS (real pairs, the ``msrs`` layout auto-detected): MSRS's larger images are capped per image by
    ``max_patches_by_set`` while RoadScene keeps every patch; ``rs/test+ms/test`` is one evaluation set holding both
    sets' pairs, each labelled with its own data set; a union whose parts share an id is refused."""
    ms_ids = sorted(p.stem for p in (DATA / "msrs" / "ir").glob("*.png"))[:3]
    for kind in ("ir", "vi"):
        for i in ms_ids:
            _link(DATA / "msrs" / kind / f"{i}.png", tmp_path / "ms" / kind / f"{i}.png")
    specs = (DatasetSpec(name="rs", root=str(_small_copy(tmp_path)), ratio={"train": 4, "test": 2}),
             DatasetSpec(name="ms", root=str(tmp_path / "ms"), ratio={"train": 2, "test": 1}))
    manifest = build_manifest(PrepareParams(datasets=specs))
    params = dataclasses.replace(SHARD_PARAMS, train=("rs/train", "ms/train"), eval=("rs/test+ms/test",),
                                 max_patches_by_set={"ms/train": 5})
    index = write_shards(manifest, params, tmp_path / "s")
    grids = {e["id"]: len(range(0, e["height"] - 64 + 1, 48)) * len(range(0, e["width"] - 64 + 1, 48))
             for e in select(manifest, "rs/train+ms/train")}
    assert min(grids[e["id"]] for e in select(manifest, "ms/train")) > 5  # the cap bites
    expected = sum(grids[e["id"]] for e in select(manifest, "rs/train")) + 5 * len(select(manifest, "ms/train"))
    assert index["sets"]["train"]["samples"] == expected
    union = index["sets"]["rs/test+ms/test"]
    assert union["sources"] == ["rs/test", "ms/test"] and union["samples"] == 3
    seen = {meta["id"]: meta["dataset"] for meta, _, _ in iter_eval(set_files(tmp_path / "s", "rs/test+ms/test"))}
    assert seen == {e["id"]: d for d in ("rs", "ms") for e in select(manifest, f"{d}/test")}
    twice = dataclasses.replace(params, eval=("rs/test+rs/test",))
    with pytest.raises(InputError, match=r"rs/test\+rs/test has id .* twice \(in rs and rs\)"):
        write_shards(manifest, twice, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(Exception, match="max_patches_by_set"):
        dataclasses.replace(params, max_patches_by_set={"ms/test": 5})
