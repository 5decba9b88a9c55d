"""WebDataset shards: training patches and whole-image evaluation sets, written deterministically.

Sample layout: ``<key>.ir.png`` (grey), ``<key>.vi.png`` (training: visible luminance Y, grey; evaluation: the
visible image as shipped, grey or RGB) and ``<key>.json`` (dataset, split, id, crop box ``[top, left, h, w]``).
Same manifest + params → byte-identical shards: sorted input, seeded shuffles, ``mtime=0`` in every member.
Each set is a multiple of ``shard_multiple`` shards of near-equal size; ``shards.json`` records counts, bytes and
sha256 of every shard. The training reader takes each rank's part of every global batch of one epoch order, so any
ranks × loader workers fit any shard count and train on the same global batches. A shard folder may be a path or an
object-store URL (``s3://…``, :mod:`cs2fusion.storage`).
"""

from __future__ import annotations

import dataclasses
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

from cs2fusion import storage
from cs2fusion.config import ImpairParams, ShardParams, set_parts, spell_union
from cs2fusion.data.impair import impair
from cs2fusion.data.manifest import select, sha256_file
from cs2fusion.data.pairs import Pair, load_pair
from cs2fusion.io import InputError, atomic_dir, read_grey, safe_name
from cs2fusion.span import split_batch

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
    return [(top, left) for top in range(0, height - patch + 1, stride) for left in range(0, width - patch + 1, stride)]


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
    for name in (part for train in params.train for part in set_parts(train)):
        for entry in select(manifest, name):
            grid = patch_grid(entry["height"], entry["width"], params.patch_size, params.stride)
            cap = params.max_patches_by_set.get(name, params.max_patches_per_image)
            if cap and len(grid) > cap:
                keep = rng.choice(len(grid), cap, replace=False)
                grid = [grid[k] for k in sorted(keep)]
            plan.extend((name.partition("/")[0], entry, top, left) for top, left in grid)
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
    """Whole-image samples of one ``<dataset>/<split>`` set (or a union ``a/x+b/y``), in manifest order (visible as
    shipped). Fused images are named by id, so a union whose parts share an id is refused."""
    parts = [(part.partition("/")[0], select(manifest, part)) for part in set_parts(name)]
    ids: dict[str, str] = {}
    for dataset, entries in parts:
        for entry in entries:
            if entry["id"] in ids:
                raise InputError(f"{entry['ir']}: evaluation set {name} has id {entry['id']!r} twice (in "
                                 f"{ids[entry['id']]} and {dataset}): fused images are named by id")
            ids[entry["id"]] = dataset
    for dataset, entries in parts:
        for entry in entries:
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
    """Shard file prefix of an evaluation set ``<dataset>/<split>`` (a union's parts joined by ``_and_``)."""
    return spell_union(name.replace("/", "-"))


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
    ``out`` may not be, hold or lie in ``inputs`` or a data set root of the manifest. An object-store URL is written
    through a local folder, ``shards.json`` last."""
    check_no_leak(manifest, params)
    roots = tuple(ds["root"] for ds in manifest["datasets"].values())
    target = (storage.remote_output(str(out), "shard", index="shards.json") if storage.is_url(out)
              else atomic_dir(out, "shard", inputs=(*inputs, *roots)))
    with target as tmp:
        sets: dict[str, Any] = {}
        if params.train:
            samples = train_samples(manifest, params)
            records = write_set(samples, tmp, "train", params)
            sets["train"] = {"kind": "train", "sources": list(params.train), "patch_size": params.patch_size,
                             "samples": len(samples), "shards": records}
        for name in params.eval:
            samples = list(tqdm(eval_samples(manifest, name), desc=f"packing {name}", unit="pair", disable=None))
            records = write_set(samples, tmp, set_prefix(name), params)
            sets[name] = {"kind": "eval", "sources": set_parts(name), "samples": len(samples), "shards": records}
        index = {"version": SHARDS_VERSION, "sets": sets}
        (tmp / "shards.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def read_index(folder: str | Path) -> dict[str, Any]:
    """``shards.json`` of a shard folder (a path or an object-store URL)."""
    location = storage.join(folder, "shards.json")
    if storage.size(location) is None:
        raise InputError(f"{location}: no shard index (run the shard stage)")
    try:
        index = json.loads(storage.read_bytes(location))
    except (OSError, ValueError) as err:
        raise InputError(f"{location}: unreadable shard index ({err})") from None
    if not isinstance(index, dict) or index.get("version") != SHARDS_VERSION:
        raise InputError(f"{location}: not a version-{SHARDS_VERSION} shard index; rerun the shard stage")
    return index


def set_shards(folder: str | Path, name: str) -> list[tuple[str, int]]:
    """(location, sample count) of every shard of set ``name``, checked against ``shards.json``: local shards by
    sha256, objects in a store by size (hashing them would read the whole set on every node)."""
    index = read_index(folder)
    if name not in index["sets"]:
        raise InputError(f"{folder}: no shard set {name!r} ({', '.join(index['sets'])})")
    shards = []
    for record in index["sets"][name]["shards"]:
        file = safe_name(record["file"], storage.join(folder, "shards.json"))
        if storage.is_url(folder):
            location = storage.join(folder, file)
            found = storage.size(location)
            if found != record["bytes"]:
                raise InputError(f"{location}: shard {'missing' if found is None else 'corrupt (size differs)'}; "
                                 "rerun the shard stage or push it again (dvc push)")
        else:
            location = str(Path(folder, file).resolve())
            verify_shard(Path(location), record["sha256"])
        shards.append((location, int(record["samples"])))
    return shards


def set_files(folder: str | Path, name: str) -> list[str]:
    """Locations of the shards of set ``name`` (checked as in :func:`set_shards`)."""
    return [location for location, _ in set_shards(folder, name)]


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


def _tar_samples(url: str) -> Iterator[dict[str, Any]]:
    with storage.open_read(url) as stream:
        yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}]))


def read_samples(files: list[str], *, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of ``files`` in order (of each file, positions ``start`` to ``stop``), each key checked: no
    folders, absolute or ``..`` member names, no key twice in a shard. Any unreadable shard raises InputError naming
    it."""
    for url in files:
        seen: set[str] = set()
        try:
            for position, sample in enumerate(_tar_samples(url)):
                if stop is not None and position >= stop:
                    break
                key = sample["__key__"]
                if "/" in key or key in ("", ".", "..") or os.path.isabs(key):
                    raise InputError(f"{url}: unsafe member name {key!r} (shards hold flat keys only)")
                if key in seen:
                    raise InputError(f"{url}: key {key!r} appears twice")
                seen.add(key)
                if position >= start:
                    yield sample
        except InputError:
            raise
        except Exception as err:  # tar and webdataset errors: the user needs the shard's name
            raise InputError(f"{url}: unreadable shard ({err})") from None


def epoch_steps(counts: list[int], *, batch_size: int) -> int:
    """Global batches per epoch (the remainder, fewer than ``batch_size`` samples, waits for another epoch)."""
    return sum(counts) // batch_size


@dataclasses.dataclass(frozen=True)
class EpochOrder:
    """One epoch's order of samples, a function of (seed, epoch) alone: the shards are read in ``shard_order`` as one
    stream (shard ``shard_order[j]`` from stream position ``starts[j]``), and ``order[p]`` is the stream position of
    the sample at global position p: each run of ``window`` stream positions is shuffled within itself."""

    shard_order: np.ndarray
    starts: np.ndarray
    order: np.ndarray
    window: int

    def positions(self, *, batch_size: int, world_size: int, rank: int, worker: int = 0,
                  workers: int = 1) -> np.ndarray:
        """The global positions one (rank, loader worker) reads, ascending: rank r holds part r of every global batch
        of ``batch_size`` (:func:`~cs2fusion.span.split_batch`); loader worker w of ``workers`` the batches w,
        w + workers, … (the order a DataLoader takes them in)."""
        sizes = split_batch(batch_size, world_size)
        batches = np.arange(worker, len(self.order) // batch_size, workers)
        return (batches[:, None] * batch_size + sum(sizes[:rank]) + np.arange(sizes[rank])).ravel()


def epoch_order(counts: list[int], *, seed: int, epoch: int, window: int) -> EpochOrder:
    """The global sample order of ``epoch`` (:class:`EpochOrder`): independent of ranks, loader workers and of which
    reader reads which shard, so any cluster shape trains on the same global batches."""
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(counts))
    sizes = np.asarray(counts, dtype=np.int64)[shard_order]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    total = int(sizes.sum())
    order = np.concatenate([first + np.random.default_rng([seed, epoch, 1, first // window]).permutation(
        min(window, total - first)) for first in range(0, total, window)] or [np.zeros(0, np.int64)])
    return EpochOrder(shard_order, starts, order.astype(np.int64), window)


def sample_seed(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The RNG of one sample in one epoch, whichever worker reads it."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


class TrainShards(torch.utils.data.IterableDataset):
    """Training patches streamed from shards: each rank's part of every global batch, through DataLoader workers.

    ``shards``: (location, sample count) pairs (:func:`set_shards`). Yields ``(key, ir, vis_y, vis_y_impaired)``:
    tensors (1, P, P) float in [0, 1]: for ``rank`` of ``world_size``, part ``rank`` (:attr:`local_batch` samples)
    of each global batch of ``batch_size`` samples, in the epoch's order (:func:`epoch_order`; ``shuffle_buffer``
    samples are shuffled together), so that the global batches do not depend on the cluster's shape. Every reader
    streams the shards once per epoch and decodes only its own samples, holding at most its part of one shuffle
    window. The impaired view is made on the fly from a per-sample, per-epoch seed (a fresh cut-out every epoch;
    reproducible). Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``.
    """

    def __init__(self, shards: list[tuple[str, int]], *, batch_size: int = 1, rank: int = 0, world_size: int = 1,
                 seed: int = 0, impair_params: ImpairParams = ImpairParams(), shuffle_buffer: int = 256) -> None:
        super().__init__()
        if not shards:
            raise InputError("no training shards")
        self.shards, self.batch_size, self.rank, self.world_size = list(shards), batch_size, rank, world_size
        self.seed, self.impair_params, self.shuffle_buffer = seed, impair_params, shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def local_batch(self) -> int:
        """This rank's samples of each global batch (the DataLoader's batch size)."""
        return split_batch(self.batch_size, self.world_size)[self.rank]

    def steps(self) -> int:
        """Batches every rank gets per epoch, whatever the loader workers (:func:`epoch_steps`)."""
        return epoch_steps([n for _, n in self.shards], batch_size=self.batch_size)

    def order(self) -> EpochOrder:
        """This epoch's global order (:func:`epoch_order`)."""
        return epoch_order([n for _, n in self.shards], seed=self.seed, epoch=self.epoch, window=self.shuffle_buffer)

    def _decode(self, sample: dict[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
        key = sample["__key__"]
        ir, vi = _decode_members(sample, "ir.png", "vi.png")
        vi_imp = impair(vi, sample_seed(self.seed, self.epoch, key), self.impair_params)
        as_t = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0)[None]  # noqa: E731
        return key, as_t(ir), as_t(vi), as_t(vi_imp)

    def _stream(self, order: EpochOrder) -> Iterator[tuple[int, dict[str, Any]]]:
        """(stream position, raw sample) of every shard in the epoch's shard order."""
        for first, shard in zip(order.starts, order.shard_order):
            url, count = self.shards[shard]
            seen = 0
            for seen, sample in enumerate(read_samples([url], stop=count), start=1):
                yield int(first) + seen - 1, sample
            if seen != count:
                raise InputError(f"{url}: {seen} samples, shards.json says {count}; rerun the shard stage")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = self.order()
        mine = order.positions(batch_size=self.batch_size, world_size=self.world_size, rank=self.rank,
                               worker=worker, workers=workers)
        stream = self._stream(order)
        windows = mine // order.window
        for window in np.unique(windows):
            positions = mine[windows == window]
            wanted = set(order.order[positions].tolist())
            last, held = max(wanted), {}
            for position, sample in stream:  # one pass over the stream, window after window
                if position in wanted:
                    held[position] = sample
                if position == last:
                    break
            for p in positions:
                yield self._decode(held.pop(int(order.order[p])))


def _decode_members(sample: dict[str, Any], *names: str) -> list[np.ndarray]:
    """The named PNG members of a sample; a missing or undecodable one raises InputError naming the shard and the
    member (a shard written corrupt passes its checksum: only decoding finds it)."""
    arrays = []
    for name in names:
        where = f"{sample.get('__url__')}: member {sample['__key__']}.{name}"
        if name not in sample:
            raise InputError(f"{where} missing; rerun the shard stage")
        try:
            arrays.append(decode_png(sample[name]))
        except Exception as err:  # PIL raises several kinds for a broken PNG
            raise InputError(f"{where} is not a readable PNG ({type(err).__name__}); rerun the shard stage") from None
    return arrays


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
