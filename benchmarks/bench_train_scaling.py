"""Data-parallel training on this machine: 1 worker × 2 threads vs 2 workers × 1 thread (DDP over gloo, the global
batch's terms through :mod:`cs2fusion.span`), with the share of step time spent in collectives and the bytes each
rank gathers per step. Real RoadScene patches, the preset's step (l1, SSIM 150, max 2, grad 1, robust_sharp map,
batch-scope normalisation), global batch 16. No Ray: ``train_step`` itself, so start-up does not blur the ratio (the
train stage adds data loading: its samples/s are logged as ``epoch/perf/samples_per_s``).
Run: python -m benchmarks.bench_train_scaling [--patch 128] [--steps 4] [--json out.json]   (~2 min at 128²)
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import DATA, report

BATCH = 16
COLLECTIVES = ("gloo:", "c10d::", "nccl:")  # profiler event names of the process groups' operations


def _samples(patch: int) -> tuple[torch.Tensor, ...]:
    from cs2fusion.data.crops import random_crops

    ids = [line.split()[1] for line in (DATA / "roadscene" / "splits" / "auif_train180.txt").read_text()
           .splitlines() if line and not line.startswith("#")]
    return random_crops(DATA / "roadscene", ids, count=BATCH, patch=patch, rng=np.random.default_rng(0))


def _worker(rank: int, world: int, threads: int, port: int, patch: int, steps: int, out: str) -> None:
    from cs2fusion.config import LossParams, ModelParams, TrainParams
    from cs2fusion.span import BatchSpan
    from cs2fusion.training import build_state, train_step

    torch.set_num_threads(threads)
    model = ModelParams(norm_scope="batch", map_norm="robust", map_spread=0.5)
    train = TrainParams(batch_size=BATCH, lr_backbone=2e-4, lr_cpn=2e-5,
                        loss=LossParams(intensity="l1", ssim_weight=150.0, max_weight=2.0, grad_weight=1.0))
    torch.manual_seed(0)
    state = build_state(model, train)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ddp = torch.nn.parallel.DistributedDataParallel
        state.backbone_train, state.cpn_train = ddp(state.backbone), ddp(state.cpn)
        state.span = BatchSpan.of(BATCH, dist.new_group())
    sizes = state.span.sizes or (BATCH,)
    first = sum(sizes[:rank])
    batch = tuple(t[first:first + sizes[rank]] for t in _samples(patch))
    train_step(state, batch, train)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            train_step(state, batch, train)
        elapsed = time.perf_counter() - start
    collective = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith(COLLECTIVES)) / 1e6
    if rank == 0:
        torch.save({"step_s": elapsed / steps, "collective_s": collective / steps}, out)
    if world > 1:
        dist.destroy_process_group()


def gathered_bytes(patch: int, batch: int = BATCH, channels: int = 16, world: int = 2) -> dict[str, float]:
    """Bytes one rank receives per step for the contrastive losses (fp32): four (B, 4C·P²) tensors gathered
    (map_ir, map_vis and both impaired-pass SSO features), and the two with gradients reduced back (reduce-scatter
    on NCCL; gloo all-reduces the whole tensor)."""
    row = 4 * channels * patch * patch * 4
    share = (world - 1) / world
    return {"gather_forward": 4 * batch * row * share, "reduce_backward_nccl": 2 * batch * row * share,
            "reduce_backward_gloo": 2 * 2 * batch * row * share}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--patch", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world, threads in ((1, 2), (2, 1)):
            out = str(Path(tmp) / f"{world}.pt")
            mp.start_processes(_worker, args=(world, threads, free_port(), args.patch, args.steps, out),
                               nprocs=world, start_method="spawn")
            m = torch.load(out, weights_only=True)
            rows.append({"config": f"{world} worker(s) x {threads} thread(s)", "samples/s": BATCH / m["step_s"],
                         "step s": m["step_s"], "collectives share": m["collective_s"] / m["step_s"]})
    rows.append({"config": "ratio (2 workers / 1 worker)", "samples/s": rows[1]["samples/s"] / rows[0]["samples/s"]})
    volume = gathered_bytes(args.patch)
    rows.append({"config": "MiB per rank per step, 2 ranks", **{k: v / 2**20 for k, v in volume.items()}})
    report(f"data-parallel train_step, global batch {BATCH}, {args.patch}x{args.patch} patches, {args.steps} steps",
           rows, args.json)


if __name__ == "__main__":
    main()
