"""Stage ``train``: Ray Train ``TorchTrainer`` (DDP over N workers, CPU or GPU), MLflow-logged, checkpointed.

The loop body is :mod:`cs2fusion.training`; this file holds the Ray touch points (device, DDP, rank-split
samples, ``ray.train.report`` with checkpoints, ``FailureConfig``) and the MLflow run. ``RAY_ADDRESS`` attaches
to an existing cluster (code and environment shipped: :mod:`pipeline.cluster`); shards, ``train.storage_path`` and
``--out`` may be object-store URLs. A rerun with the same params and shards continues the run from its latest
checkpoint (``train.resume: auto``); checks that can fail (params, shards, the start checkpoint, the tracking
server, stores the nodes reach) run before anything is started or moved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cs2fusion import storage
from cs2fusion.checkpoint import load_checkpoint, read_meta, save_checkpoint
from cs2fusion.color import luminance
from cs2fusion.config import Params, ParamsError, TrainParams, build, flatten, to_dict
from cs2fusion.data.shards import TrainShards, iter_eval, set_files, set_shards
from cs2fusion.inference import FuseOptions, Fuser
from cs2fusion.io import InputError, write_png, write_text
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.span import BatchSpan
from cs2fusion.training import (build_state, cpn_input_order, load_optim_state, lrs, map_stats, optim_state,
                                 run_epoch, step_precision)
from cs2fusion.validation import baseline_scores, mean_scores, selection_score, validate
from cs2fusion.visual import grid
from pipeline import cluster
from pipeline.common import (Stopped, absolute, clean_errors, location, parser, setup, stop_on_sigterm,
                             stopped_by_sigterm)
from pipeline.lease import RunLease
from pipeline.progress import Board, Follower, Reporter

log = logging.getLogger("pipeline.train")
MODEL_FILE, STATE_FILE, RUN_ID_FILE = "model.safetensors", "train_state.pt", "mlflow_run_id"
# each checkpoint carries every epoch's metrics so far: the curves survive a machine whose MLflow store lacks the run
HISTORY_FILE = "history.jsonl"
FINGERPRINT_FILE, CODE_FILE, SPILL_FILE = "fingerprint", "code_digest", "unlogged_metrics.jsonl"
SCORE, GRID_ROWS = "val/score", 4
# Knobs a resumed run may change: they do not alter what the finished model is (epochs extends a run; any cluster shape
# trains the same model: cs2fusion.span)
RESUMABLE_KNOBS = ("train.resume", "train.epochs", "train.val_samples", "train.scaling.", "train.tracking.")


def _init_nets(params: Params) -> tuple[Backbone, CompensationPerceptionNetwork]:
    torch.manual_seed(params.train.seed)
    backbone, cpn = Backbone(params.model), CompensationPerceptionNetwork(params.model)
    if params.train.init_from:
        ckpt = load_checkpoint(params.train.init_from, with_cpn=bool(read_meta(params.train.init_from).get("has_cpn")))
        backbone.load_state_dict(ckpt.backbone.state_dict())
        if ckpt.cpn is not None:
            cpn.load_state_dict(ckpt.cpn.state_dict())
    return backbone, cpn


def _validate(backbone: Backbone, cpn: CompensationPerceptionNetwork, pairs: list[tuple[np.ndarray, np.ndarray]],
              baseline: dict[str, float], tp: TrainParams) -> tuple[dict[str, float], np.ndarray]:
    """``val/<metric>`` means (the nine main metrics, the source correlations, how far the output selects a source
    per pixel (:func:`cs2fusion.validation.selection_stats`), ``val/score``, the CPN map's ``map_mean`` / ``map_high``
    / ``map_std``) of the current nets on whole validation images, and a grid (ir | visible | fused)."""
    device = next(backbone.parameters()).device
    # direct convolutions: no kernel build inside a training worker, and the same path on every machine
    scores, fused = validate(Fuser(backbone, device=device, options=FuseOptions(winograd=False)), pairs)

    def unit(x: np.ndarray) -> torch.Tensor:  # uint8 (H, W) → (1, 1, H, W) in [0, 1]
        return torch.from_numpy(np.asarray(x, np.float32) / 255)[None, None].to(device)

    maps = [map_stats(backbone, cpn, ir=unit(ir), vis_y=unit(luminance(vi)),
                      step_order=tp.step_order) for ir, vi in pairs]
    backbone.train()
    scores.update(mean_scores(maps))
    scores["score"] = selection_score(scores, baseline, tp.select)
    rows = [[ir, vi, f] for f, (ir, vi) in zip(fused[:GRID_ROWS], pairs)]
    return {f"val/{k}": v for k, v in scores.items()}, grid(rows)


def _val_pairs(files: list[str], count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ir, vi) for _, ir, vi in itertools.islice(iter_eval(files), count)]


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The folder of the latest checkpoint Ray registered for a run (from its checkpoint manager's snapshot)."""
    snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    return Path(run_dir) / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]


def read_history(folder: str | Path) -> list[dict[str, float]]:
    """The per-epoch metrics a checkpoint folder carries (empty for checkpoints written before it did)."""
    path = Path(folder) / HISTORY_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def write_history(folder: str | Path, rows: list[dict[str, float]]) -> None:
    """Writes the per-epoch metrics into a checkpoint folder, one JSON object per epoch."""
    (Path(folder) / HISTORY_FILE).write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def _broadcast(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank (every rank reports the same validation metrics to Ray)."""
    if world > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def _across_ranks(means: dict[str, float], world: int, device: torch.device) -> dict[str, float]:
    """Epoch means averaged over ranks (the loss terms are the global batch's already, the same on every rank);
    throughput summed (the whole cluster's samples/s)."""
    if world > 1:
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
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
    torch.set_num_threads(tp.scaling.threads_per_worker)
    device = ray.train.torch.get_device()
    quick_http()
    plain = Tracker(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    tracker = BufferedTracker(plain, config["spill"]) if plain else None
    logged = {"loss/backbone": -1, "epoch/loss/backbone": -1}  # the last step / epoch already in MLflow

    backbone, cpn = _init_nets(params)
    backbone.to(device)
    cpn.to(device)
    state = build_state(params.model, tp, backbone=backbone, cpn=cpn)
    history: list[dict[str, float]] = []
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as folder:
            ckpt = load_checkpoint(Path(folder) / MODEL_FILE, with_cpn=True)
            backbone.load_state_dict(ckpt.backbone.state_dict())
            cpn.load_state_dict(ckpt.cpn.state_dict())
            load_optim_state(state, torch.load(Path(folder) / STATE_FILE, weights_only=True))
            history = read_history(folder)
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
    if world > 1:  # the batch-spanning terms' collectives, apart from DDP's gradient all-reduces
        state.span = BatchSpan.of(tp.batch_size, torch.distributed.new_group())
    dataset = TrainShards(set_shards(config["shards"], "train"), batch_size=tp.batch_size, rank=rank,
                          world_size=world, seed=tp.seed, impair_params=params.impair, shuffle_buffer=tp.shuffle_buffer)
    loader = torch.utils.data.DataLoader(dataset, batch_size=dataset.local_batch, num_workers=tp.scaling.loader_workers,
                                         drop_last=True)
    val_pairs = _val_pairs(set_files(config["shards"], tp.val_set), tp.val_samples) if tp.val_set and rank == 0 else []
    val_baseline = baseline_scores(val_pairs) if val_pairs else {}
    validating = bool(_broadcast(bool(val_pairs), world))
    if tracker:
        tracker.tags({"precision": step_precision(tp, device.type)})
    reporter = Reporter(config.get("progress") if rank == 0 else None, epochs=tp.epochs, batch_size=tp.batch_size)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        reporter.step(step, metrics["loss/backbone"])
        if tracker and step % tp.tracking.log_every == 0 and step > logged["loss/backbone"]:
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
            means = _across_ranks(run_epoch(state, loader, tp, steps=steps, device=device, on_step=on_step), world,
                                  device)
            means["perf/workers"] = world  # elastic runs change it; the step does not
            reporter.end_epoch(means)
            # per-epoch values under keys of their own: the per-step lr/* are logged at global steps
            metrics = {**{f"epoch/{k}": v for k, v in {**means, **lrs(state)}.items()}, "epoch": state.epoch,
                       "step": state.step}
            last = state.epoch == tp.epochs
            with tempfile.TemporaryDirectory() as folder:
                val, picture = {}, None
                if validating and (state.epoch % tp.val_every == 0 or last):
                    if rank == 0:
                        val, picture = _validate(backbone, cpn, val_pairs, val_baseline, tp)
                    val = _broadcast(val, world)
                    metrics.update(val)
                history.append({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
                checkpoint = None
                if tracker and state.epoch > logged["epoch/loss/backbone"]:
                    tracker.metrics({k: v for k, v in metrics.items() if k != "step"}, step=state.epoch)
                    if picture is not None:  # beside, not inside, the checkpoint: images stay out of run state
                        with tempfile.TemporaryDirectory() as pictures:
                            path = Path(pictures) / f"val_epoch_{state.epoch:03d}.png"
                            write_png(path, picture)
                            tracker.artifact(path, "val_samples")
                if rank == 0 and (state.epoch % tp.checkpoint_every == 0 or last):
                    extra = {"cpn_input_order": cpn_input_order(tp), "step_order": tp.step_order}
                    extra.update({"val_score": val[SCORE], "val_select": tp.select} if val else {})
                    save_checkpoint(Path(folder) / MODEL_FILE, backbone, cpn, epoch=state.epoch, step=state.step,
                                    **extra)
                    torch.save(optim_state(state), Path(folder) / STATE_FILE)
                    write_history(folder, history)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                if tracker:  # the epoch's metrics reach MLflow first: a sweep's scheduler may stop a trial at once
                    tracker.drain(10)
                ray.train.report(metrics, checkpoint=checkpoint)
        finished = True
    finally:
        if tracker:  # a failing attempt does not wait long: Ray restarts it, or the stage fails
            tracker.close(tp.tracking.patience_s if finished else 30)


def worker_input_error(err: BaseException) -> InputError | None:
    """The bad-input error (e.g. a corrupt shard member) that failed a training worker, unwrapped from Ray's
    ``WorkerGroupError``; None when the run failed for another reason."""
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        for candidate in (getattr(failure, "cause", None), failure.__cause__, failure):
            if isinstance(candidate, (InputError, ParamsError)):
                return InputError(candidate.args[0] if candidate.args else str(candidate))
    return None


def _checkpoint_config(tp: Any, config_class: Any) -> Any:
    """With validation, Ray ranks checkpoints by ``val/score`` (keeping the two best and always the latest, which
    resumes); without, it keeps the two latest."""
    if tp.val_set:
        return config_class(num_to_keep=2, checkpoint_score_attribute=SCORE, checkpoint_score_order="max")
    return config_class(num_to_keep=2)


def _final_checkpoint(result: Any, tp: Any) -> tuple[Any, str]:
    """The checkpoint that becomes the model (``train.keep``), and why, in words for its metadata."""
    if tp.keep == "best" and tp.val_set:
        scored = [(m[SCORE], m["epoch"], c) for c, m in result.best_checkpoints or [] if SCORE in m]
        if scored:
            score, epoch, checkpoint = max(scored, key=lambda t: (t[0], t[1]))
            return checkpoint, f"best {SCORE} ({tp.select}) {score:.4f} at epoch {epoch} of {tp.epochs}"
    return result.checkpoint, f"last epoch ({result.metrics.get('epoch')} of {tp.epochs})"


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
    """What makes two runs the same run: the model, impair and train params that differ from their defaults (a knob
    added later, at its default, leaves a run's fingerprint as it was), less the knobs a resumed run may change, and
    the training shards. The training code is compared separately (:func:`plan_run`); the start checkpoint
    (``init_from``) by its bytes' sha256, so a moved or re-cloned checkout still resumes."""
    sections = ("model", "impair", "train")
    defaults = flatten({name: to_dict(getattr(Params(), name)) for name in sections})
    knobs = flatten({name: to_dict(getattr(params, name)) for name in sections})
    what = {k: v for k, v in knobs.items()
            if not k.startswith(RESUMABLE_KNOBS) and (k not in defaults or v != defaults[k])}
    if what.get("train.init_from"):
        start = storage.read_bytes(str(what["train.init_from"]))
        what["train.init_from"] = "sha256:" + hashlib.sha256(start).hexdigest()
    what["shards"] = shards_sha256
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def plan_run(run_dir: str | Path, mode: str, print_: str, code: str = "") -> tuple[bool, str | None]:
    """(True, None): resume the run in ``run_dir`` (a folder or an object-store prefix); else (False, where a previous
    run there was moved aside: it is never deleted). ``auto`` resumes the same params, shards and code; ``must``
    resumes the same params and shards even where the training code changed since (a long run carried across code
    fixes, logged), and fails otherwise."""
    previous = storage.read_text(storage.join(run_dir, FINGERPRINT_FILE))
    previous = previous.strip() if previous is not None else None
    same = previous == print_ and storage.exists(storage.join(run_dir, RUN_ID_FILE))
    old_code = (storage.read_text(storage.join(run_dir, CODE_FILE)) or "").strip()
    if mode == "must" and not same:
        why = "other params or shards" if previous else "nothing to resume"
        raise InputError(f"{run_dir}: train.resume is 'must' but {why} there")
    if same and mode == "must" and old_code != code:
        log.warning("resuming %s although the training code changed since it started (train.resume: must)", run_dir)
        storage.write_text(storage.join(run_dir, CODE_FILE), code + "\n")
    if same and (mode == "must" or (mode == "auto" and old_code == code)):
        return True, None
    if not storage.exists(run_dir):
        return False, None
    aside = f"{run_dir}.{time.strftime('%Y%m%d-%H%M%S')}"
    storage.move(run_dir, aside)
    reason = ("train.resume is 'never'" if mode == "never" else "its training code differs (train.resume: must "
              "continues it)") if same else "its params or shards differ"
    log.warning("previous run moved aside to %s (%s); starting a new run", aside, reason)
    return False, aside


def _preflight(params: Params, shards: str, uri: str, storage_root: str) -> str:
    """Everything that can be checked before work starts: stores every node reaches (on a cluster), shards present
    and intact, the start checkpoint loadable, the tracking server reachable. Returns the shard index's sha256."""
    from pipeline.mlflow_adapter import check_reachable

    cluster.check_stores(params, shards=shards, tracking_uri=uri, storage_path=storage_root)
    if not storage.is_url(storage_root):  # a file, /proc/…, a read-only folder: refused before a run is created
        Path(storage_root).mkdir(parents=True, exist_ok=True)
        probe = Path(storage_root) / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    set_files(shards, "train")
    if params.train.val_set:  # decoded here too: a corrupt member fails now, not in every retried worker group
        _val_pairs(set_files(shards, params.train.val_set), params.train.val_samples)
    if params.train.init_from:
        load_checkpoint(params.train.init_from, with_cpn=False)
    check_reachable(uri)
    return hashlib.sha256(storage.read_bytes(storage.join(shards, "shards.json"))).hexdigest()


def _new_tracker(params: Params, uri: str, root: Path, shards_sha: str, run_dir: str, continues: str = "",
                 extra: dict[str, str] | None = None) -> Any:
    """A new MLflow run for this training run (its id stored beside the checkpoints); ``continues``: the run id an
    earlier part of it logged to elsewhere."""
    from pipeline.mlflow_adapter import artifact_location, git_commit, new_run

    tp = params.train
    tracker = new_run(uri, tp.tracking.experiment, artifact_location(params.tracking, root), tp.run_name)
    tracker.params(to_dict(params))
    tags = {"git_commit": git_commit(root), "shards_sha256": shards_sha, "stage": "train", "storage": run_dir}
    tracker.tags({**tags, **(extra or {}), **({"continues_run": continues} if continues else {})})
    try:
        storage.write_text(storage.join(run_dir, RUN_ID_FILE), tracker.run_id)
    except BaseException as err:
        end_run(tracker, err)
        raise
    return tracker


def end_run(tracker: Any, err: BaseException) -> None:
    """A training that stopped or failed ends its MLflow run KILLED (interrupted, SIGTERM) or FAILED, with the
    reason as the tag ``failure``; a tracking server that does not answer leaves it to the next start."""
    from pipeline.mlflow_adapter import retrying

    status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    try:
        retrying(lambda: tracker.tags({"failure": reason[:5000]}), "tags", 30)
        retrying(lambda: tracker.finish(status), "finish", 30)
    except Exception:
        log.warning("MLflow run %s could not be marked %s; the next start marks it", tracker.run_id, status)


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


def _run_trainer(params: Params, tracker: Any, *, shards: str, uri: str, run_dir: str, storage_root: str,
                 resume: bool, callbacks: tuple[Any, ...], progress: bool) -> Any:
    """Ray Train's ``TorchTrainer`` over :func:`train_loop`, logging to ``tracker``'s run; returns its result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tp, scaling = params.train, params.train.scaling
    config = {"params": to_dict(params), "shards": shards, "tracking_uri": uri,
              "run_id": tracker.run_id, "spill": storage.join(run_dir, SPILL_FILE), "continuing": resume}
    cluster.init()
    stop_on_sigterm()  # after ray.init, which installs a handler of its own (the driver then aborted: exit 134)
    import ray

    board = ray.remote(num_cpus=0)(Board).remote() if progress else None
    config["progress"] = board
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo", timeout_s=scaling.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=scaling.worker_range if scaling.elastic else scaling.worker_range[0],
                                     use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker, **scaling.worker_resources}),
        run_config=RunConfig(name=tp.run_name, storage_path=storage_root,
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=_checkpoint_config(tp, CheckpointConfig), callbacks=list(callbacks)),
    )
    try:
        with Follower(board) if board else contextlib.nullcontext():
            return trainer.fit()
    except KeyboardInterrupt:
        ray.shutdown()  # the workers and the controller end with the driver, not at interpreter exit
        if stopped_by_sigterm():  # Ray's blocking get turns the handler's exception into a KeyboardInterrupt
            raise Stopped("stopped by SIGTERM") from None
        raise


def fit(params: Params, *, shards: str | Path, out: str | Path, metrics_out: Path | None, root: Path,
        tags: dict[str, str] | None = None, callbacks: tuple[Any, ...] = (), progress: bool = True) -> dict[str, Any]:
    """Runs the trainer and writes the final model (a path or an object-store URL); returns the final metrics (with
    the MLflow run id). ``tags`` go on a new MLflow run (a sweep's trial: ``mlflow.parentRunId``); ``callbacks``
    are Ray Train callbacks (a sweep's ``TuneReportCallback``); ``progress``: the live progress line."""
    from pipeline.mlflow_adapter import quick_http, tracking_uri

    tp = params.train
    if tp.init_from:  # Ray workers run in another folder
        params = dataclasses.replace(params, train=dataclasses.replace(tp, init_from=absolute(tp.init_from)))
        tp = params.train
    shards, storage_root = absolute(shards), absolute(tp.storage_path)
    run_dir = storage.join(storage_root, tp.run_name)
    uri = tracking_uri(params.tracking, root)
    quick_http()
    shards_sha = _preflight(params, shards, uri, storage_root)
    lease = RunLease(run_dir)
    lease.acquire()  # before anything of the run is read, moved or logged: one trainer per run
    try:
        return _fit_holding_the_lease(params, shards=shards, out=out, metrics_out=metrics_out, root=root, tags=tags,
                                      callbacks=callbacks, progress=progress, shards_sha=shards_sha, uri=uri,
                                      run_dir=run_dir, storage_root=storage_root)
    finally:
        lease.release()


def _fit_holding_the_lease(params: Params, *, shards: str, out: str | Path, metrics_out: Path | None, root: Path,
                           tags: dict[str, str] | None, callbacks: tuple[Any, ...], progress: bool, shards_sha: str,
                           uri: str, run_dir: str, storage_root: str) -> dict[str, Any]:
    """:func:`fit` once its preflight passed and it holds the run's lease."""
    from pipeline.mlflow_adapter import Tracker, git_commit, retrying, run_status

    tp = params.train

    def patiently(call: Any, what: str) -> Any:
        return retrying(call, what, tp.tracking.patience_s)

    print_, code = fingerprint(params, shards_sha), code_digest()
    resume, aside = plan_run(run_dir, tp.resume, print_, code)
    if resume:
        tracker = Tracker(uri, storage.read_text(storage.join(run_dir, RUN_ID_FILE)).strip())
        status = patiently(lambda: run_status(tracker), "status")
        if status is None:  # e.g. the run's state came with the repository to a machine with another store
            log.info("MLflow run %s is not in %s: continuing in a new run tagged continues_run", tracker.run_id, uri)
            tracker = _new_tracker(params, uri, root, shards_sha, run_dir, continues=tracker.run_id, extra=tags)
        elif status != "RUNNING":
            patiently(tracker.reopen, "reopen")
        log.info("resuming run %s (MLflow run %s) from its latest checkpoint", run_dir, tracker.run_id)
    else:
        if aside:
            _mark_stale(uri, aside)
        tracker = _new_tracker(params, uri, root, shards_sha, run_dir, extra=tags)
    try:
        if not resume:
            storage.write_text(storage.join(run_dir, FINGERPRINT_FILE), print_ + "\n")
            storage.write_text(storage.join(run_dir, CODE_FILE), code + "\n")
        result = _run_trainer(params, tracker, shards=shards, uri=uri, run_dir=run_dir, storage_root=storage_root,
                              resume=resume, callbacks=callbacks, progress=progress)
    except BaseException as err:
        cause = worker_input_error(err)
        end_run(tracker, cause or err)
        if cause:  # bad input inside a worker: its one line, not Ray's report of every worker's traceback
            raise cause from None
        raise
    chosen, why = _final_checkpoint(result, tp)
    with chosen.as_directory() as folder:
        ckpt = load_checkpoint(Path(folder) / MODEL_FILE, with_cpn=True)
        meta = ckpt.meta
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    final.update({"mlflow_run_id": tracker.run_id, "selected_epoch": meta["epoch"]})
    log.info("final model: epoch %s (%s)", meta["epoch"], why)
    patiently(lambda: tracker.tags({"selected_epoch": str(meta["epoch"]), "selection": why}), "tags")
    with tempfile.TemporaryDirectory() as folder:
        model = Path(folder) / Path(str(out)).name if storage.is_url(out) else Path(out)
        kept = {k: meta[k] for k in ("cpn_input_order", "step_order", "val_score", "val_select") if k in meta}
        save_checkpoint(model, ckpt.backbone, ckpt.cpn, epoch=meta["epoch"], step=meta["step"], selection=why, **kept,
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
