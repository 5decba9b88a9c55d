"""Shard throughput (issue 3): writing shards, reading them with the training reader, vs reading the PNG folders
directly, and what one training step consumes, all in one run.  Run: python -m benchmarks.bench_shards

The training reference is the measured samples/s of ``train_step`` (batch 16, 128×128, 2 threads) on this
machine; the reader must deliver at least 5× that.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks.common import DATA, report
from cs2fusion.config import DatasetSpec, ModelParams, PrepareParams, ShardParams, TrainParams
from cs2fusion.data.manifest import build_manifest, select
from cs2fusion.data.shards import TrainShards, read_index, set_shards, write_shards
from cs2fusion.io import read_grey
from cs2fusion.training import build_state, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pairs", type=int, default=60, help="RoadScene training pairs to use")
    args = p.parse_args()
    torch.set_num_threads(2)
    root = DATA / "roadscene"
    spec = DatasetSpec(name="rs", root=str(root), lists={"train": str(root / "splits/auif_train180.txt")})
    manifest = build_manifest(PrepareParams(datasets=(spec,)))
    entries = select(manifest, "rs/train")[: args.pairs]
    manifest["datasets"]["rs"]["pairs"] = entries
    params = ShardParams(train=("rs/train",), patch_size=128, stride=64)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_shards(manifest, params, tmp)
        write_s = time.perf_counter() - t
        n = read_index(tmp)["sets"]["train"]["samples"]
        rows.append({"what": "write shards (decode, cut, encode)", "samples": n, "samples/s": n / write_s})

        reader = TrainShards(set_shards(tmp, "train"), seed=0)
        t = time.perf_counter()
        count = sum(1 for _ in reader)
        read_s = time.perf_counter() - t
        rows.append({"what": "read shards (+ impaired view)", "samples": count, "samples/s": count / read_s})

    t = time.perf_counter()
    cut = 0
    for e in entries:  # the naive alternative: decode the PNG folders and cut patches each epoch
        ir, vi = read_grey(e["ir"]), read_grey(e["vi"])
        for top in range(0, ir.shape[0] - 127, 64):
            for left in range(0, ir.shape[1] - 127, 64):
                _ = (ir[top : top + 128, left : left + 128], vi[top : top + 128, left : left + 128])
                cut += 1
    rows.append({"what": "read PNG folders directly", "samples": cut, "samples/s": cut / (time.perf_counter() - t)})

    train = TrainParams()
    state = build_state(ModelParams(), train)
    batch = tuple(torch.rand(16, 1, 128, 128) for _ in range(3))
    train_step(state, batch, train)
    t = time.perf_counter()
    train_step(state, batch, train)
    consumed = 16 / (time.perf_counter() - t)
    rows.append({"what": "training consumes (batch 16, 128x128, 2 threads)", "samples": 16, "samples/s": consumed})
    ratio = rows[1]["samples/s"] / consumed
    report(f"shards; reader delivers {ratio:.0f}x what training consumes (target >= 5x)", rows)


if __name__ == "__main__":
    main()
