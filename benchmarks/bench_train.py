"""Training step: the fast path vs the plain fp32 eager step, same process, same real batches (issue 17).

plain = the release's formulation in fp32 (``fast_losses: false``, ``precision: fp32``); fast = what
``params.yaml`` runs (``fast_losses: true``, ``precision: bf16`` where the hardware has bf16, else fp32). Reports
samples/s of each (rounds interleaved, so drift in the machine's speed hits both alike), the ratio, GFLOP/s from one
training sample's counted FLOPs against an sgemm (and, with native bf16, a bf16 gemm) peak measured in the same
run, and the loss after the same ``--loss-steps`` steps from the same init on the same batches, both evaluated
with the plain step on one held-out batch.
Run: python -m benchmarks.bench_train [--json out.json]   (~5 min on 2 cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import DATA, REPO, report
from cs2fusion.color import luminance
from cs2fusion.config import ImpairParams, ModelParams, TrainParams
from cs2fusion.data.impair import impair
from cs2fusion.data.pairs import Pair, load_pair
from cs2fusion.training import bf16_native, build_state, step_precision, train_step

SPLIT = REPO / "presets" / "roadscene" / "splits" / "train168.txt"


def real_batches(count: int, batch: int, size: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` batches of random (ir, vis Y, impaired vis Y) crops of RoadScene training pairs, in [0, 1]."""
    ids = [line.split()[0] for line in SPLIT.read_text().splitlines() if line.strip() and not line.startswith("#")]
    rng = np.random.default_rng(seed)
    root = DATA / "roadscene"
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for _ in range(count):
        parts: list[list[np.ndarray]] = [[], [], []]
        for _ in range(batch):
            pid = ids[int(rng.integers(len(ids)))]
            if pid not in cache:
                ir, vi = load_pair(Pair(pid, root / "ir" / f"{pid}.png", root / "vi" / f"{pid}.png"))
                cache[pid] = (ir, luminance(vi))
            ir, y = cache[pid]
            top, left = (int(rng.integers(0, n - size + 1)) for n in ir.shape)
            a = ir[top:top + size, left:left + size].astype(np.float32) / 255
            b = y[top:top + size, left:left + size].astype(np.float32) / 255
            for k, x in enumerate((a, b, impair(b, rng, ImpairParams()))):
                parts[k].append(x)
        out.append(tuple(torch.from_numpy(np.stack(p)[:, None]) for p in parts))
    return out


def gemm_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def flops_per_sample(train: TrainParams, batch: tuple[torch.Tensor, ...]) -> float:
    state = build_state(ModelParams(norm_scope="batch"), train)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(state, batch, train)
    return counter.get_total_flops() / batch[0].shape[0]


def throughput(configs: dict[str, TrainParams], batches: list, rounds: int) -> dict[str, float]:
    """samples/s per config: ``rounds`` interleaved rounds over ``batches`` each, after one warm-up step."""
    states = {}
    for name, train in configs.items():
        torch.manual_seed(0)
        states[name] = build_state(ModelParams(norm_scope="batch"), train)
        train_step(states[name], batches[0], train)
    elapsed = dict.fromkeys(configs, 0.0)
    for _ in range(rounds):
        for name, train in configs.items():
            t0 = time.perf_counter()
            for batch in batches:
                train_step(states[name], batch, train)
            elapsed[name] += time.perf_counter() - t0
    samples = rounds * sum(b[0].shape[0] for b in batches)
    return {name: samples / t for name, t in elapsed.items()}


def loss_after(train: TrainParams, reference: TrainParams, batches: list, held_out: tuple) -> dict[str, float]:
    """Trains from the seeded init over ``batches``; the plain step's losses on ``held_out`` at the final weights."""
    torch.manual_seed(0)
    state = build_state(ModelParams(norm_scope="batch"), train)
    for batch in batches:
        train_step(state, batch, train)
    return train_step(copy.deepcopy(state), held_out, reference)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--steps", type=int, default=2, help="steps per round of the throughput measurement")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--loss-steps", type=int, default=200)
    p.add_argument("--loss-batch", type=int, default=4)
    p.add_argument("--loss-patch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="write plain/fast samples/s and the loss difference")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plain = TrainParams(fast_losses=False, precision="fp32")
    fast = TrainParams(fast_losses=True, precision="bf16")
    precision = step_precision(fast, "cpu")
    batches = real_batches(args.steps, args.batch, args.patch, seed=0)
    speed = throughput({"plain": plain, "fast": fast}, batches, args.rounds)
    per_sample = {name: flops_per_sample(t, tuple(x[:4] for x in batches[0])) for name, t in
                  (("plain", plain), ("fast", fast))}
    peak = {"fp32": gemm_gflops(torch.float32)}
    if bf16_native("cpu"):
        peak["bf16"] = gemm_gflops(torch.bfloat16)
    loss_batches = real_batches(args.loss_steps, args.loss_batch, args.loss_patch, seed=1)
    held_out = real_batches(1, args.loss_batch, args.loss_patch, seed=2)[0]
    losses = {name: loss_after(t, plain, loss_batches, held_out) for name, t in (("plain", plain), ("fast", fast))}
    rel = {k: abs(losses["fast"][k] - losses["plain"][k]) / abs(losses["plain"][k]) for k in ("loss/backbone",
                                                                                            "loss/cpn")}
    rows = []
    for name in ("plain", "fast"):
        gflops = speed[name] * per_sample[name] / 1e9
        rows.append({"step": name, "precision": "fp32" if name == "plain" else precision,
                     "samples/s": speed[name], "GFLOP/sample": per_sample[name] / 1e9, "GFLOP/s": gflops,
                     "of sgemm peak": gflops / peak["fp32"],
                     f"loss/backbone after {args.loss_steps}": losses[name]["loss/backbone"],
                     f"loss/cpn after {args.loss_steps}": losses[name]["loss/cpn"]})
    rows.append({"step": "fast / plain", "samples/s": speed["fast"] / speed["plain"],
                 f"loss/backbone after {args.loss_steps}": rel["loss/backbone"],
                 f"loss/cpn after {args.loss_steps}": rel["loss/cpn"]})
    report(f"training step, batch {args.batch} of {args.patch}² RoadScene patches, {args.threads} threads; "
           f"peak GFLOP/s {', '.join(f'{k} {v:.0f}' for k, v in peak.items())}; last row: ratio and |Δloss|/loss", rows)
    if args.json:
        args.json.write_text(json.dumps({
            "plain_samples_per_s": speed["plain"], "fast_samples_per_s": speed["fast"],
            "loss_rel_diff": max(rel.values()), "fast_precision": precision, "peak_gflops": peak,
            "gflop_per_sample": per_sample, "loss_steps": args.loss_steps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
