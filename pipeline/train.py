"""Stage ``train``: Ray Train ``TorchTrainer`` (DDP over N workers, CPU or GPU), MLflow-logged, checkpointed.

The loop body is :mod:`cs2fusion.training`; this file holds the Ray touch points (device, DDP, rank-split
samples, ``ray.train.report`` with checkpoints, ``FailureConfig``) and the MLflow run. ``RAY_ADDRESS`` attaches
to an existing cluster (code and environment shipped: :mod:`pipeline.cluster`); shards, ``train.storage_path`` and
``--out`` may be object-store URLs. A rerun with the same params and shards continues the run from its latest
checkpoint (``train.resume: auto``); checks that can fail (params, shards, the start checkpoint, the tracking
server, stores the nodes reach) run before anything is started or moved.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cs2fusion import storage
from cs2fusion.checkpoint import load_checkpoint, save_checkpoint
from cs2fusion.config import Params, build, to_dict
from cs2fusion.data.shards import TrainShards, iter_eval, set_files, set_shards
from cs2fusion.inference import Fuser
from cs2fusion.io import InputError, write_png, write_text
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.training import build_state, load_optim_state, lrs, optim_state, run_epoch
from cs2fusion.visual import grid
from pipeline import cluster
from pipeline.common import absolute, clean_errors, location, parser, setup
from pipeline.progress import Board, Follower, Reporter

log = logging.getLogger("pipeline.train")
MODEL_FILE, STATE_FILE, RUN_ID_FILE = "model.safetensors", "train_state.pt", "mlflow_run_id"
FINGERPRINT_FILE, SPILL_FILE = "fingerprint", "unlogged_metrics.jsonl"
# Knobs a resumed run may change: they do not alter what the finished model is (epochs extends a run).
RESUMABLE_KNOBS = ("resume", "epochs", "max_failures", "collective_timeout_s", "log_every", "tracking_patience_s",
                   "val_samples", "worker_resources")


def _init_nets(params: Params) -> tuple[Backbone, CompensationPerceptionNetwork]:
    torch.manual_seed(params.train.seed)
    backbone, cpn = Backbone(params.model), CompensationPerceptionNetwork(params.model)
    if params.train.init_from:
        ckpt = load_checkpoint(params.train.init_from, with_cpn=False)
        backbone.load_state_dict(ckpt.backbone.state_dict())
        if ckpt.meta.get("has_cpn"):
            cpn.load_state_dict(load_checkpoint(params.train.init_from, with_cpn=True).cpn.state_dict())
    return backbone, cpn


def _val_grid(backbone: Backbone, files: list[str], count: int) -> np.ndarray:
    fuser = Fuser(backbone, device=next(backbone.parameters()).device)
    rows = []
    for k, (_, ir, vi) in enumerate(iter_eval(files)):
        if k >= count:
            break
        rows.append([ir, vi, fuser.fuse(vis=vi, ir=ir)])
    backbone.train()
    return grid(rows)


def _across_ranks(means: dict[str, float], world: int) -> dict[str, float]:
    """Epoch means averaged over ranks; throughput summed (the whole cluster's samples/s)."""
    if world > 1:
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(values)
        means = {k: float(v) / world for k, v in zip(keys, values)}
        means["perf/samples_per_s"] *= world
    return means


def _record_placement(tracker: Any, rank: int, world: int) -> None:
    """Tags ``worker/<rank>/…``: the Ray node each rank runs on and where its code was imported from (attached to a
    cluster: the py_modules Ray shipped to that node)."""
    import ray

    import cs2fusion

    mine = {"node_id": ray.get_runtime_context().get_node_id(), "code": str(Path(cs2fusion.__file__).parent)}
    everyone = [mine]
    if world > 1:
        everyone = [None] * world
        torch.distributed.all_gather_object(everyone, mine)
    if tracker:
        tracker.tags({f"worker/{r}/{k}": v for r, info in enumerate(everyone) for k, v in info.items()})


def train_loop(config: dict[str, Any]) -> None:
    """Per-worker loop (runs inside Ray Train workers)."""
    import ray.train
    import ray.train.torch

    from pipeline.mlflow_adapter import BufferedTracker, Tracker, quick_http

    params: Params = build(Params, config["params"])
    tp = params.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(tp.threads_per_worker)
    device = ray.train.torch.get_device()
    quick_http()
    plain = Tracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    tracker = BufferedTracker(plain, config["spill"]) if plain else None
    logged = {"loss/backbone": -1, "epoch/loss/backbone": -1}  # the last step / epoch already in MLflow

    backbone, cpn = _init_nets(params)
    backbone.to(device)
    cpn.to(device)
    state = build_state(params.model, tp, backbone=backbone, cpn=cpn)
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as folder:
            ckpt = load_checkpoint(Path(folder) / MODEL_FILE, with_cpn=True)
            backbone.load_state_dict(ckpt.backbone.state_dict())
            cpn.load_state_dict(ckpt.cpn.state_dict())
            load_optim_state(state, torch.load(Path(folder) / STATE_FILE, weights_only=True))
        log.info("rank %d resumed at epoch %d, step %d", rank, state.epoch, state.step)
        if tracker:
            tracker.metrics({"resume/from_epoch": state.epoch, "resume/from_step": state.step}, step=state.step)
    if tracker and (resumed or config["continuing"]):
        try:  # what a stopped attempt logged after its last checkpoint (or before any) is not logged twice
            logged = plain.last_steps(list(logged))
        except Exception as err:  # the server may be down now: then duplicates are possible, nothing is lost
            log.warning("could not read the logged steps of run %s (%s)", plain.run_id, type(err).__name__)
    _record_placement(tracker, rank, world)
    state.backbone_train = ray.train.torch.prepare_model(backbone)
    state.cpn_train = ray.train.torch.prepare_model(cpn)

    if tp.batch_size % world:
        raise InputError(f"train.batch_size {tp.batch_size} is not divisible by num_workers {world}")
    local_batch = tp.batch_size // world
    dataset = TrainShards(set_shards(config["shards"], "train"), local_batch=local_batch, rank=rank, world_size=world,
                          seed=tp.seed, impair_params=params.impair, shuffle_buffer=tp.shuffle_buffer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=local_batch, num_workers=tp.loader_workers,
                                         drop_last=True)
    val_files = set_files(config["shards"], tp.val_set) if tp.val_set and tracker else []
    reporter = Reporter(config.get("progress") if rank == 0 else None, epochs=tp.epochs, batch_size=tp.batch_size)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        reporter.step(step, metrics["loss/backbone"])
        if tracker and step % tp.log_every == 0 and step > logged["loss/backbone"]:
            tracker.metrics({**metrics, **lrs(state)}, step=step)

    finished = False
    try:
        while state.epoch < tp.epochs:
            dataset.set_epoch(state.epoch)
            steps = dataset.steps()
            if tp.max_steps_per_epoch:
                steps = min(steps, tp.max_steps_per_epoch)
            if steps == 0:
                raise InputError(f"too few training samples for batch {tp.batch_size} on {world} workers")
            reporter.start_epoch(state.epoch, steps, state.step)
            means = _across_ranks(run_epoch(state, loader, tp, steps=steps, device=device, on_step=on_step), world)
            reporter.end_epoch(means)
            metrics = {**{f"epoch/{k}": v for k, v in means.items()}, **lrs(state), "epoch": state.epoch,
                       "step": state.step}
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if tracker and state.epoch > logged["epoch/loss/backbone"]:
                    tracker.metrics({k: v for k, v in metrics.items() if k != "step"}, step=state.epoch)
                    if val_files:
                        write_png(Path(folder) / f"val_epoch_{state.epoch:03d}.png",
                                  _val_grid(backbone, val_files, tp.val_samples))
                        tracker.artifact(Path(folder) / f"val_epoch_{state.epoch:03d}.png", "val_samples")
                last = state.epoch == tp.epochs
                if rank == 0 and (state.epoch % tp.checkpoint_every == 0 or last):
                    save_checkpoint(Path(folder) / MODEL_FILE, backbone, cpn, epoch=state.epoch, step=state.step)
                    torch.save(optim_state(state), Path(folder) / STATE_FILE)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint)
        finished = True
    finally:
        if tracker:  # a failing attempt does not wait long: Ray restarts it, or the stage fails
            tracker.close(tp.tracking_patience_s if finished else 30)


def _loss_plot(tracker: Any, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key in zip(axes, ("loss/backbone", "loss/cpn")):
        hist = sorted(tracker.history(key))
        ax.plot([s for s, _ in hist], [v for _, v in hist], lw=1)
        ax.set(title=key, xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def code_digest() -> str:
    """sha256 of the training code: the ``cs2fusion`` package and this stage (a fix to the loss is a new run)."""
    repo = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*(repo / "cs2fusion").rglob("*.py"), *(repo / "cs2fusion").rglob("*.cpp"),
                        repo / "pipeline" / "train.py", repo / "pipeline" / "progress.py"]):
        digest.update(path.relative_to(repo).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(params: Params, shards_sha256: str) -> str:
    """What makes two runs the same run: the model, impair and train params (less the knobs a resumed run may
    change), the training shards and the training code."""
    train = {k: v for k, v in to_dict(params.train).items() if k not in RESUMABLE_KNOBS}
    what = {"model": to_dict(params.model), "impair": to_dict(params.impair), "train": train, "shards": shards_sha256,
            "code": code_digest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def plan_run(run_dir: str | Path, mode: str, print_: str) -> tuple[bool, str | None]:
    """(True, None): resume the run in ``run_dir`` (a folder or an object-store prefix); else (False, where a previous
    run there was moved aside: it is never deleted)."""
    previous = storage.read_text(storage.join(run_dir, FINGERPRINT_FILE))
    previous = previous.strip() if previous is not None else None
    same = previous == print_ and storage.exists(storage.join(run_dir, RUN_ID_FILE))
    if mode == "must" and not same:
        why = "other params, shards or code" if previous else "nothing to resume"
        raise InputError(f"{run_dir}: train.resume is 'must' but {why} there")
    if same and mode in ("auto", "must"):
        return True, None
    if not storage.exists(run_dir):
        return False, None
    aside = f"{run_dir}.{time.strftime('%Y%m%d-%H%M%S')}"
    storage.move(run_dir, aside)
    reason = "train.resume is 'never'" if same else "its params, shards or code differ"
    log.warning("previous run moved aside to %s (%s); starting a new run", aside, reason)
    return False, aside


def _preflight(params: Params, shards: str, uri: str, storage_root: str) -> str:
    """Everything that can be checked before work starts: stores every node reaches (on a cluster), shards present
    and intact, the start checkpoint loadable, the tracking server reachable. Returns the shard index's sha256."""
    from pipeline.mlflow_adapter import check_reachable

    cluster.check_stores(params, shards=shards, tracking_uri=uri, storage_path=storage_root)
    set_files(shards, "train")
    if params.train.val_set:
        set_files(shards, params.train.val_set)
    if params.train.init_from:
        load_checkpoint(params.train.init_from, with_cpn=False)
    check_reachable(uri)
    return hashlib.sha256(storage.read_bytes(storage.join(shards, "shards.json"))).hexdigest()


def _mark_stale(uri: str, run_dir: str) -> None:
    """A run left RUNNING by a killed stage is marked KILLED when a new run replaces it."""
    from pipeline.mlflow_adapter import Tracker

    run_id = storage.read_text(storage.join(run_dir, RUN_ID_FILE))
    if run_id is None:
        return
    try:
        old = Tracker(uri, run_id.strip())
        if old.status() == "RUNNING":
            old.finish("KILLED")
            log.info("MLflow run %s of the stopped attempt marked KILLED", old.run_id)
    except Exception as err:  # another store, a deleted run: nothing to mark
        log.debug("previous MLflow run not marked: %s", err)


def fit(params: Params, *, shards: str | Path, out: str | Path, metrics_out: Path | None,
        root: Path) -> dict[str, Any]:
    """Runs the trainer and writes the final model (a path or an object-store URL); returns the final metrics (with
    the MLflow run id)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.mlflow_adapter import (Tracker, artifact_location, git_commit, new_run, quick_http, retrying,
                                         tracking_uri)

    tp = params.train
    if tp.init_from:  # Ray workers run in another folder
        params = dataclasses.replace(params, train=dataclasses.replace(tp, init_from=absolute(tp.init_from)))
        tp = params.train
    shards, storage_root = absolute(shards), absolute(tp.storage_path)
    run_dir = storage.join(storage_root, tp.run_name)
    uri = tracking_uri(params.tracking, root)
    quick_http()
    shards_sha = _preflight(params, shards, uri, storage_root)

    def patiently(call: Any, what: str) -> Any:
        return retrying(call, what, tp.tracking_patience_s)

    print_ = fingerprint(params, shards_sha)
    resume, aside = plan_run(run_dir, tp.resume, print_)
    if resume:
        tracker = Tracker(uri, storage.read_text(storage.join(run_dir, RUN_ID_FILE)).strip())
        if patiently(tracker.status, "status") != "RUNNING":
            patiently(tracker.reopen, "reopen")
        log.info("resuming run %s (MLflow run %s) from its latest checkpoint", run_dir, tracker.run_id)
    else:
        if aside:
            _mark_stale(uri, aside)
        tracker = new_run(uri, tp.experiment, artifact_location(params.tracking, root), tp.run_name)
        tracker.params(to_dict(params))
        tracker.tags({"git_commit": git_commit(root), "shards_sha256": shards_sha, "stage": "train",
                      "storage": run_dir})
        storage.write_text(storage.join(run_dir, RUN_ID_FILE), tracker.run_id)
        storage.write_text(storage.join(run_dir, FINGERPRINT_FILE), print_ + "\n")
    config = {"params": to_dict(params), "shards": shards, "tracking_uri": uri,
              "run_id": tracker.run_id, "spill": storage.join(run_dir, SPILL_FILE), "continuing": resume}
    cluster.init()
    import ray

    board = ray.remote(num_cpus=0)(Board).remote()
    config["progress"] = board
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if tp.use_gpu else "gloo", timeout_s=tp.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=tp.num_workers, use_gpu=tp.use_gpu,
                                     resources_per_worker={"CPU": tp.cpus_per_worker, **tp.worker_resources}),
        run_config=RunConfig(name=tp.run_name, storage_path=storage_root,
                             failure_config=FailureConfig(max_failures=tp.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        with Follower(board):
            result = trainer.fit()
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            retrying(lambda: tracker.finish(status), "finish", 30)
        except Exception:
            log.warning("MLflow run %s could not be marked %s; the next start marks it", tracker.run_id, status)
        raise
    with result.checkpoint.as_directory() as folder:
        ckpt = load_checkpoint(Path(folder) / MODEL_FILE, with_cpn=True)
        meta = ckpt.meta
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    final["mlflow_run_id"] = tracker.run_id
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / Path(str(out)).name if storage.is_url(out) else Path(out)
        save_checkpoint(model, ckpt.backbone, ckpt.cpn, epoch=meta["epoch"], step=meta["step"],
                        mlflow_run_id=tracker.run_id, git_commit=git_commit(root), shards_sha256=shards_sha,
                        source="cs2fusion train stage")
        if storage.is_url(out):
            storage.upload_file(model, str(out))
        if metrics_out:
            write_text(metrics_out, json.dumps(final, indent=2, sort_keys=True) + "\n")
        patiently(lambda: _loss_plot(tracker, Path(folder) / "loss_curves.png"), "history")
        patiently(lambda: tracker.artifact(Path(folder) / "loss_curves.png", "plots"), "artifact upload")
        patiently(lambda: tracker.artifact(model, "model"), "artifact upload")
    patiently(tracker.finish, "finish")
    return final


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--shards", type=location, required=True, help="shard folder or s3:// prefix (shard stage)")
    p.add_argument("--out", type=location, required=True, help="final model checkpoint (.safetensors; path or URL)")
    p.add_argument("--metrics", type=Path, default=None, help="final training metrics (JSON)")
    p.add_argument("--resume", choices=("auto", "never", "must"), default=None,
                   help="override train.resume: auto continues a same-params run, never starts over, must fails "
                        "without a run to continue")
    args = p.parse_args()
    params = setup(args)
    if args.resume:
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, resume=args.resume))
    final = fit(params, shards=args.shards, out=args.out, metrics_out=args.metrics, root=Path.cwd())
    log.info("trained: epoch %s, step %s, MLflow run %s", final.get("epoch"), final.get("step"),
             final["mlflow_run_id"])


if __name__ == "__main__":
    main()
