"""WebDataset shards: training patches and whole-image evaluation sets, written deterministically.

Sample layout: ``<key>.ir.png`` (grey), ``<key>.vi.png`` (training: visible luminance Y, grey; evaluation: the
visible image as shipped, grey or RGB) and ``<key>.json`` (dataset, split, id, crop box ``[top, left, h, w]``).
Same manifest + params → byte-identical shards: sorted input, seeded shuffles, ``mtime=0`` in every member.
Each set is a multiple of ``shard_multiple`` shards of near-equal size, so ranks × loader workers get equal
shares; ``shards.json`` records counts, bytes and sha256 of every shard.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import urllib.parse
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from cs2fusion.config import ImpairParams, ShardParams
from cs2fusion.data.impair import impair
from cs2fusion.data.manifest import select, sha256_file
from cs2fusion.data.pairs import Pair, load_pair
from cs2fusion.io import InputError, atomic_dir, read_grey, safe_name

log = logging.getLogger(__name__)
SHARDS_VERSION = 2  # 2: keys escape '.', '_' and '/' (injective); 1 replaced them with '_' (p.1 = p_1)


def png_bytes(array: np.ndarray) -> bytes:
    """Lossless PNG encoding (fast setting; deterministic for equal input)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 array as stored."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def patch_grid(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of every ``patch``×``patch`` window on a ``stride`` grid inside the image."""
    return [(t, l) for t in range(0, height - patch + 1, stride) for l in range(0, width - patch + 1, stride)]


def _escape(part: str) -> str:
    # WebDataset splits keys at the first dot and treats '/' as a folder; '_' is escaped too, so that the '__'
    # between parts stays unambiguous and distinct ids never share a key.
    return urllib.parse.quote(part, safe="").replace(".", "%2E").replace("_", "%5F")


def _key(dataset: str, pair_id: str, suffix: str = "") -> str:
    return f"{_escape(dataset)}__{_escape(pair_id)}{suffix}"


def train_samples(manifest: dict[str, Any], params: ShardParams) -> list[dict[str, Any]]:
    """Every training patch of the ``params.train`` sets, in a seeded shuffled order (images decoded once)."""
    rng = np.random.default_rng(params.seed)
    plan: list[tuple[str, dict[str, Any], int, int]] = []
    for name in params.train:
        for entry in select(manifest, name):
            grid = patch_grid(entry["height"], entry["width"], params.patch_size, params.stride)
            if params.max_patches_per_image and len(grid) > params.max_patches_per_image:
                keep = rng.choice(len(grid), params.max_patches_per_image, replace=False)
                grid = [grid[k] for k in sorted(keep)]
            plan.extend((name.partition("/")[0], entry, t, l) for t, l in grid)
    if not plan:
        raise InputError(f"no training patches: images smaller than patch_size {params.patch_size}?")
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    samples = []
    p = params.patch_size
    for k in tqdm(rng.permutation(len(plan)), desc="cutting patches", unit="patch", disable=None):
        dataset, entry, top, left = plan[k]
        if entry["ir"] not in cache:
            cache[entry["ir"]] = (read_grey(entry["ir"]), read_grey(entry["vi"]))
        ir, vi_y = cache[entry["ir"]]
        meta = {"dataset": dataset, "split": entry["split"], "id": entry["id"], "crop": [top, left, p, p]}
        samples.append(
            {
                "__key__": _key(dataset, entry["id"], f"__{top}_{left}"),
                "ir.png": png_bytes(ir[top : top + p, left : left + p]),
                "vi.png": png_bytes(vi_y[top : top + p, left : left + p]),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
    return samples


def eval_samples(manifest: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Whole-image samples of one ``<dataset>/<split>`` set, in manifest order (visible as shipped)."""
    dataset = name.partition("/")[0]
    for entry in select(manifest, name):
        ir, vi = load_pair(Pair(entry["id"], Path(entry["ir"]), Path(entry["vi"])))
        meta = {"dataset": dataset, "split": entry["split"], "id": entry["id"], "crop": [0, 0, *ir.shape[:2]]}
        yield {
            "__key__": _key(dataset, entry["id"]),
            "ir.png": png_bytes(ir),
            "vi.png": png_bytes(vi),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }


def shard_count(samples: int, params: ShardParams) -> int:
    """Shards for a set: enough for ``max_samples_per_shard``, rounded up to ``shard_multiple``, ≤ samples."""
    need = math.ceil(samples / params.max_samples_per_shard)
    need = math.ceil(need / params.shard_multiple) * params.shard_multiple
    return max(1, min(samples, need))


def write_set(samples: list[dict[str, Any]], folder: Path, prefix: str, params: ShardParams) -> list[dict[str, Any]]:
    """Writes ``samples`` as near-equal shards ``<prefix>-NNNNNN.tar``; returns their records."""
    n = shard_count(len(samples), params)
    bounds = np.linspace(0, len(samples), n + 1).round().astype(int)
    records = []
    for j in range(n):
        path = folder / f"{prefix}-{j:06d}.tar"
        with open(path, "wb") as stream:
            writer = wds.TarWriter(stream, mtime=0, user="cs2fusion", group="cs2fusion", encoder=False)
            for sample in samples[bounds[j] : bounds[j + 1]]:
                writer.write(sample)
            writer.close()
        records.append(
            {"file": path.name, "samples": int(bounds[j + 1] - bounds[j]), "bytes": path.stat().st_size,
             "sha256": sha256_file(path)}
        )
    return records


def set_prefix(name: str) -> str:
    """Shard file prefix of an evaluation set ``<dataset>/<split>``."""
    return name.replace("/", "-")


def check_no_leak(manifest: dict[str, Any], params: ShardParams) -> None:
    """Refuses an evaluation set that shares an image with the training sets: the same decoded infrared or visible
    pixels (a re-encoded or renamed copy is still the same image)."""
    trained = {e[f"{kind}_pixels_sha256"]: (name, e["id"]) for name in params.train for e in select(manifest, name)
               for kind in ("ir", "vi")}
    for name in params.eval:
        for entry in select(manifest, name):
            for kind in ("ir", "vi"):
                if entry[f"{kind}_pixels_sha256"] in trained:
                    source, pid = trained[entry[f"{kind}_pixels_sha256"]]
                    raise InputError(f"{entry[kind]}: evaluation set {name} contains training pair {source}:{pid} "
                                     "(same pixels)")


def write_shards(manifest: dict[str, Any], params: ShardParams, out: str | Path,
                 inputs: tuple[str | Path, ...] = ()) -> dict[str, Any]:
    """Writes every set of ``params`` into ``out`` (replaced atomically as a whole) with ``shards.json``;
    ``out`` may not be, hold or lie in ``inputs`` or a data set root of the manifest."""
    check_no_leak(manifest, params)
    roots = tuple(ds["root"] for ds in manifest["datasets"].values())
    with atomic_dir(out, "shard", inputs=(*inputs, *roots)) as tmp:
        sets: dict[str, Any] = {}
        if params.train:
            samples = train_samples(manifest, params)
            records = write_set(samples, tmp, "train", params)
            sets["train"] = {"kind": "train", "sources": list(params.train), "patch_size": params.patch_size,
                             "samples": len(samples), "shards": records}
        for name in params.eval:
            samples = list(tqdm(eval_samples(manifest, name), desc=f"packing {name}", unit="pair", disable=None))
            records = write_set(samples, tmp, set_prefix(name), params)
            sets[name] = {"kind": "eval", "sources": [name], "samples": len(samples), "shards": records}
        index = {"version": SHARDS_VERSION, "sets": sets}
        (tmp / "shards.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def read_index(folder: str | Path) -> dict[str, Any]:
    """``shards.json`` of a shard folder."""
    path = Path(folder) / "shards.json"
    if not path.is_file():
        raise InputError(f"{path}: no shard index (run the shard stage)")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable shard index ({err})") from None
    if not isinstance(index, dict) or index.get("version") != SHARDS_VERSION:
        raise InputError(f"{path}: not a version-{SHARDS_VERSION} shard index; rerun the shard stage")
    return index


def set_files(folder: str | Path, name: str) -> list[str]:
    """Absolute paths of the shards of set ``name``, each checked against the sha256 ``shards.json`` records."""
    index = read_index(folder)
    if name not in index["sets"]:
        raise InputError(f"{folder}: no shard set {name!r} ({', '.join(index['sets'])})")
    files = []
    for record in index["sets"][name]["shards"]:
        path = Path(folder, safe_name(record["file"], f"{folder}/shards.json")).resolve()
        verify_shard(path, record["sha256"])
        files.append(str(path))
    return files


def verify_shard(path: Path, sha256: str) -> None:
    """Raises InputError naming ``path`` unless its bytes hash to ``sha256`` (checked once per process and file
    version)."""
    try:
        st = path.stat()
    except OSError:
        raise InputError(f"{path}: shard missing") from None
    if _shard_digest(str(path), st.st_size, st.st_mtime_ns) != sha256:
        raise InputError(f"{path}: shard corrupt (sha256 differs from shards.json); rerun the shard stage or "
                         "restore it (dvc checkout)")


@functools.lru_cache(maxsize=4096)
def _shard_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def read_samples(files: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of ``files`` in order, each key checked: no folders, absolute or ``..`` member names, no key
    twice in a shard. Any unreadable shard raises InputError naming it."""
    for url in files:
        seen: set[str] = set()
        try:
            for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
                key = sample["__key__"]
                if "/" in key or key in ("", ".", "..") or os.path.isabs(key):
                    raise InputError(f"{url}: unsafe member name {key!r} (shards hold flat keys only)")
                if key in seen:
                    raise InputError(f"{url}: key {key!r} appears twice")
                seen.add(key)
                yield sample
        except InputError:
            raise
        except Exception as err:  # tar and webdataset errors: the user needs the shard's name
            raise InputError(f"{url}: unreadable shard ({err})") from None


def split_shards(files: list[str], *, rank: int, world_size: int, worker: int, num_workers: int,
                 seed: int, epoch: int) -> list[str]:
    """This (rank, worker)'s shards for an epoch: one seeded permutation shared by all, dealt round-robin."""
    order = np.random.default_rng([seed, epoch]).permutation(len(files))
    mine = [files[k] for k in order][rank::world_size]
    return mine[worker::num_workers]


def _seeded_shuffle(samples: Iterator[Any], bufsize: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for sample in samples:
        buf.append(sample)
        if len(buf) >= bufsize:
            yield buf.pop(int(rng.integers(len(buf))))
    while buf:
        yield buf.pop(int(rng.integers(len(buf))))


def sample_seed(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The RNG of one sample in one epoch, whichever worker reads it."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class TrainShards(torch.utils.data.IterableDataset):
    """Training patches streamed from shards, split across Ray ranks and DataLoader workers.

    Yields ``(key, ir, vis_y, vis_y_impaired)``: tensors (1, P, P) float in [0, 1]. The impaired view is made on
    the fly from a per-sample, per-epoch seed (a fresh cut-out every epoch; reproducible). Call
    :meth:`set_epoch` before each epoch, as with ``DistributedSampler``.
    """

    def __init__(self, files: list[str], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 impair_params: ImpairParams = ImpairParams(), shuffle_buffer: int = 256) -> None:
        super().__init__()
        if not files:
            raise InputError("no training shards")
        self.files, self.rank, self.world_size = list(files), rank, world_size
        self.seed, self.impair_params, self.shuffle_buffer = seed, impair_params, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, sample: dict[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
        key = sample["__key__"]
        ir, vi = _decode_members(sample, "ir.png", "vi.png")
        vi_imp = impair(vi, sample_seed(self.seed, self.epoch, key), self.impair_params)
        as_t = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)[None]  # noqa: E731
        return key, as_t(ir), as_t(vi), as_t(vi_imp)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = split_shards(self.files, rank=self.rank, world_size=self.world_size, worker=worker,
                            num_workers=num_workers, seed=self.seed, epoch=self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        return map(self._decode, _seeded_shuffle(read_samples(mine), self.shuffle_buffer, rng))


def _decode_members(sample: dict[str, Any], *names: str) -> list[np.ndarray]:
    try:
        return [decode_png(sample[name]) for name in names]
    except Exception as err:  # a missing member, a broken PNG: name the shard and the sample
        raise InputError(f"{sample.get('__url__')}: sample {sample['__key__']!r} unreadable ({err!r})") from None


def iter_eval(files: list[str]) -> Iterator[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """Whole-image evaluation samples in shard order: (meta, ir uint8 (H, W), vi uint8 (H, W[, 3])); the meta's
    ``id`` is checked to be a safe file name."""
    for sample in read_samples(files):
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError) as err:
            where = f"{sample['__url__']}: sample {sample['__key__']!r}"
            raise InputError(f"{where} has no readable json ({err!r})") from None
        safe_name(str(meta.get("id", "")), f"{sample['__url__']}: sample {sample['__key__']!r}")
        yield (meta, *_decode_members(sample, "ir.png", "vi.png"))


def steps_per_epoch(index_set: dict[str, Any], *, world_size: int, loader_workers: int, local_batch: int,
                    seed: int, epoch: int) -> int:
    """Full local batches the slowest rank gets in ``epoch``: every rank runs this many steps (no DDP hang).

    Each DataLoader worker batches its own shards, so the count is summed per worker.
    """
    counts = {r["file"]: r["samples"] for r in index_set["shards"]}
    files, workers = list(counts), max(1, loader_workers)
    per_rank = []
    for rank in range(world_size):
        steps = 0
        for worker in range(workers):
            mine = split_shards(files, rank=rank, world_size=world_size, worker=worker, num_workers=workers,
                                seed=seed, epoch=epoch)
            steps += sum(counts[f] for f in mine) // local_batch
        per_rank.append(steps)
    return min(per_rank)
