"""Short-run comparison for the training step (issue 17): step order × start × CPN normalisation scope.

Each run trains the backbone + CPN with the paper's optimiser settings (Adam 2e-3 / 2e-4, batch 16, α 0.25, k 2)
for ``--epochs`` epochs over the training pairs of ``presets/roadscene/splits/train168.txt`` (``--patches`` random
crops of each pair per epoch, ``--patch`` pixels square, seeded alike for every run), then scores the backbone on
the 12 held-out pairs of ``val12.txt`` (whole images; none is a RoadScene-40 or TNO test pair): the nine main
metrics, the composite selection score and the fused image's correlation with each source. One run per line of a
JSON-lines file, so an interrupted comparison continues where it stopped.

Run: python research/short_runs.py --out research/records/short_runs.jsonl   (~4 min per run on 2 cores)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.color import luminance
from cs2fusion.config import ImpairParams, ModelParams, TrainParams
from cs2fusion.data.impair import impair
from cs2fusion.data.pairs import Pair, load_pair
from cs2fusion.inference import FuseOptions, Fuser
from cs2fusion.io import write_png
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.model.weights import load_published_backbone, load_published_cpn
from cs2fusion.training import build_state, train_step
from cs2fusion.validation import baseline_scores, selection_score, validate
from cs2fusion.visual import grid

REPO = Path(__file__).resolve().parents[1]
SPLITS = REPO / "presets" / "roadscene" / "splits"
log = logging.getLogger("short_runs")


def _ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _pairs(root: Path, ids: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [load_pair(Pair(i, root / "ir" / f"{i}.png", root / "vi" / f"{i}.png")) for i in ids]


def batches(pairs: list[tuple[np.ndarray, np.ndarray]], *, epoch: int, patches: int, size: int, batch: int,
            impair_params: ImpairParams, seed: int):
    """Seeded random crops (ir, vis Y, impaired vis Y) in [0, 1], (batch, 1, size, size) each; same for every run."""
    rng = np.random.default_rng([seed, epoch])
    samples = []
    for ir, vi in pairs:
        y = luminance(vi)
        for _ in range(patches):
            top = int(rng.integers(0, ir.shape[0] - size + 1))
            left = int(rng.integers(0, ir.shape[1] - size + 1))
            a = ir[top:top + size, left:left + size].astype(np.float32) / 255
            b = y[top:top + size, left:left + size].astype(np.float32) / 255
            samples.append((a, b, impair(b, rng, impair_params)))
    order = rng.permutation(len(samples))
    for k in range(len(order) // batch):
        chunk = [samples[i] for i in order[k * batch:(k + 1) * batch]]
        yield tuple(torch.from_numpy(np.stack([s[j] for s in chunk])[:, None]) for j in range(3))


def score_backbone(backbone: Backbone, val_pairs: list[tuple[np.ndarray, np.ndarray]], base: dict[str, float],
                   picture: Path | None = None) -> dict[str, float]:
    """Composite selection score and the nine main metrics of ``backbone`` on whole validation pairs, with how far it
    selects a source per pixel (:func:`cs2fusion.validation.selection_stats`); with ``picture``, a grid (IR | visible
    | fused) of the first three pairs written there."""
    scores, fused = validate(Fuser(backbone, options=FuseOptions(winograd=False)), val_pairs)
    if picture:
        write_png(picture, grid([[ir, vi, f] for f, (ir, vi) in zip(fused[:3], val_pairs)]))
    return {"composite": selection_score(scores, base, "composite"), **scores}


def start_nets(start: str, model: ModelParams, published: Path, seed: int):
    torch.manual_seed(seed)
    backbone, cpn = Backbone(model), CompensationPerceptionNetwork(model)
    if start.endswith(".safetensors"):  # a checkpoint's nets (its CPN too where it has one)
        ckpt = load_checkpoint(start, with_cpn=True)
        backbone.load_state_dict(ckpt.backbone.state_dict())
        cpn.load_state_dict(ckpt.cpn.state_dict())
    elif start == "pretrain":
        load_published_backbone(backbone, published / "pretrain-backbone.pt")
    elif start == "published":
        load_published_backbone(backbone, published / "backbone.pt")
        load_published_cpn(cpn, published / "cpn.pt")
    return backbone, cpn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    p.add_argument("--out", type=Path, required=True, help="results, one JSON line per run (appended)")
    p.add_argument("--pictures", type=Path, default=None, help="folder for a validation grid per run")
    p.add_argument("--orders", default="roles,literal")
    p.add_argument("--starts", default="random,pretrain")
    p.add_argument("--scopes", default="batch,sample")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--patches", type=int, default=2, help="random crops per training pair per epoch")
    p.add_argument("--patch", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    data, published = args.shared / "data" / "roadscene", args.shared / "reference" / "cs2fusion-published"
    train_pairs = _pairs(data, _ids(SPLITS / "train168.txt"))
    val_pairs = _pairs(data, _ids(SPLITS / "val12.txt"))
    base = baseline_scores(val_pairs)
    done = {json.loads(line)["run"] for line in args.out.read_text().splitlines()} if args.out.exists() else set()
    fast = FuseOptions(winograd=False)
    reference, _ = validate(Fuser(start_nets("published", ModelParams(), published, 0)[0], options=fast), val_pairs)
    log.info("published weights on val12: composite %.4f", selection_score(reference, base, "composite"))
    for order, start, scope in itertools.product(args.orders.split(","), args.starts.split(","),
                                                 args.scopes.split(",")):
        run = f"{order}/{start}/{scope}"
        if run in done:
            continue
        model = ModelParams(norm_scope=scope)
        train = TrainParams(step_order=order, fast_losses=True)
        backbone, cpn = start_nets(start, model, published, train.seed)
        state = build_state(model, train, backbone=backbone, cpn=cpn)
        epochs, t0 = [], time.perf_counter()
        for epoch in range(args.epochs):
            losses = []
            for batch in tqdm(list(batches(train_pairs, epoch=epoch, patches=args.patches, size=args.patch,
                                           batch=train.batch_size, impair_params=ImpairParams(), seed=train.seed)),
                              desc=f"{run} epoch {epoch + 1}", disable=None):
                losses.append(train_step(state, batch, train))
            last = epoch == args.epochs - 1  # the last epoch's validation images
            picture = args.pictures / f"{run.replace('/', '_')}.png" if args.pictures and last else None
            scores = score_backbone(backbone, val_pairs, base, picture)
            epochs.append({"epoch": epoch + 1, "steps": state.step, "wall_s": time.perf_counter() - t0,
                           "loss_backbone": float(np.mean([x["loss/backbone"] for x in losses])),
                           "loss_cpn": float(np.mean([x["loss/cpn"] for x in losses])), **scores})
            log.info("%s epoch %d: %s", run, epoch + 1, json.dumps({k: round(v, 4) for k, v in epochs[-1].items()}))
        record = {"run": run, "order": order, "start": start, "scope": scope, "patch": args.patch,
                  "patches_per_pair": args.patches, "epochs": epochs, "published": reference, "mean_fusion": base,
                  "train": dataclasses.asdict(train)}
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
