"""``python -m pipeline.sweep SWEEP.yaml``: an experiment as a Ray Tune sweep over the train stage's trainer.

A sweep file names base params (merged in order), fixed overrides, a search space over dotted params keys, the metric,
a scheduler (ASHA early stopping or none), the trial budget and how many trials run at once. Each trial is the train
stage (:func:`pipeline.train.fit`: a Ray Train V2 ``TorchTrainer`` reporting to Tune through ``TuneReportCallback``)
logging a nested MLflow run under one parent run. The command ends with a table of trials, the best overrides as a
params patch (YAML) and a plot of the metric per epoch, all logged to the parent run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import yaml

from cs2fusion.config import Params, ParamsError, build, load_params, merge, to_dict
from cs2fusion.io import InputError, write_text
from pipeline.common import absolute, clean_errors, setup_logging

log = logging.getLogger("pipeline.sweep")
SEARCHES = ("grid", "choice", "uniform", "loguniform")


@dataclasses.dataclass(frozen=True)
class SchedulerSpec:
    """``asha``: trials below the top 1/``reduction_factor`` at an epoch rung (from ``grace_period`` on) stop early;
    ``fifo``: every trial runs its epochs."""

    kind: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """One sweep file. ``space``: dotted params key → one of ``{grid: [...]}`` (every value; a mapping value merges
    into that section), ``{choice: [...]}``, ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``; ``samples``
    draws of the space (each grid point ``samples`` times)."""

    name: str
    params: tuple[str, ...] = ("params.yaml",)
    shards: str = "data/shards"
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    space: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    samples: int = 1
    metric: str = "val/score"
    mode: Literal["max", "min"] = "max"
    scheduler: SchedulerSpec = dataclasses.field(default_factory=SchedulerSpec)
    concurrency: int = 2
    out: str = "sweeps/results"

    def __post_init__(self) -> None:
        for key, search in self.space.items():
            if len(search) != 1 or next(iter(search)) not in SEARCHES:
                raise ParamsError(f"space.{key}: one of {{{', '.join(f'{s}: …' for s in SEARCHES)}}}")
        if self.samples < 1 or self.concurrency < 1:
            raise ParamsError("samples and concurrency: >= 1")


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """``{"train.loss.max_weight": 2}`` → ``{"train": {"loss": {"max_weight": 2}}}``."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = merge(node[last], value) if isinstance(node.get(last), dict) and isinstance(value, dict) else value
    return out


def _anchored(data: dict[str, Any], root: Path) -> dict[str, Any]:
    """``data`` with its start checkpoint made absolute against ``root`` (trials run in other folders)."""
    if data["train"]["init_from"]:
        data = {**data, "train": {**data["train"], "init_from": absolute(root / data["train"]["init_from"])}}
    return data


def base_params(spec: SweepSpec, root: Path) -> dict[str, Any]:
    """The sweep's base files (relative to ``root``) merged in order, with the fixed overrides; the start checkpoint
    made absolute. Checked by building it."""
    data = _anchored(merge(to_dict(load_params(*(root / p for p in spec.params))), nested(spec.fixed)), root)
    build(Params, data, where=f"sweep {spec.name}")
    return data


def trial_params(base: dict[str, Any], overrides: dict[str, Any], run_name: str, storage: str, root: Path) -> Params:
    """A trial's params: the sweep's base params and the trial's overrides (a start checkpoint among them relative to
    ``root``); its run in ``storage/run_name``, never resumed (a trial is new by definition)."""
    data = _anchored(merge(base, nested(overrides)), root)
    data["train"] = {**data["train"], "run_name": run_name, "storage_path": storage, "resume": "never"}
    return build(Params, data, where=f"trial {run_name}")


def load_spec(path: Path) -> SweepSpec:
    """Reads a sweep file into :class:`SweepSpec` (unknown keys and wrong types refused, as for params)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ParamsError(f"{path}: unreadable sweep file ({err})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping")
    return build(SweepSpec, data, where=str(path))


def _search_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda b: tune.uniform(*b),
            "loguniform": lambda b: tune.loguniform(*b)}
    return {key: make[kind](values) for key, search in spec.space.items() for kind, values in search.items()}


def _trial(overrides: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial (inside a Tune trial actor): the train stage on the sweep's base params with the trial's
    ``overrides`` (its Tune config), reporting to Tune; ``context``: the sweep's spec, base params, folders and parent
    MLflow run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import fit

    spec, root, folder = build(SweepSpec, context["spec"]), Path(context["root"]), Path(context["folder"])
    trial = tune.get_context().get_trial_id()
    params = trial_params(context["base"], overrides, f"{spec.name}-{trial}", str(folder / "runs"), root)
    tags = {"mlflow.parentRunId": context["parent"], "sweep": spec.name, "sweep.trial": trial,
            "sweep.overrides": json.dumps(overrides, sort_keys=True, default=str)}
    fit(params, shards=absolute(root / spec.shards), out=folder / "models" / f"{trial}.safetensors", metrics_out=None,
        root=root, tags=tags, callbacks=(TuneReportCallback(),), progress=False)


def _rows(results: Any, spec: SweepSpec, epochs: int, scope: str) -> list[dict[str, Any]]:
    """One row per trial: its overrides, how it ended, its metric (best over epochs or last) and per-epoch curve."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        curve = [] if frame is None or spec.metric not in frame else [float(v) for v in frame[spec.metric]]
        values = [v for v in curve if not math.isnan(v)]
        pick = max if spec.mode == "max" else min
        score = (pick(values) if scope == "all" else values[-1]) if values else float("nan")
        done = int((result.metrics or {}).get("epoch", 0))
        status = "error" if result.error else ("finished" if done >= epochs else f"stopped after epoch {done}")
        overrides = dict(result.config)
        trial = (result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1]
        rows.append({"trial": trial, "overrides": overrides, "status": status,
                     "score": score, "curve": curve, "error": str(result.error or "")[:200]})
    return sorted(rows, key=lambda r: (math.isnan(r["score"]), -r["score"] if spec.mode == "max" else r["score"]))


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """The trials as a Markdown table, best first."""
    lines = [f"| rank | overrides | status | {metric} | per epoch |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        overrides = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in row["overrides"].items()) or "–"
        curve = " · ".join(f"{v:.4f}" for v in row["curve"])
        lines.append(f"| {i} | {overrides} | {row['status']} | {row['score']:.4f} | {curve} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["overrides"].items())[:60]
        ax.plot(range(1, len(row["curve"]) + 1), row["curve"], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=metric, title="trials")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _close_children(uri: str, parent: str, rows: list[dict[str, Any]]) -> None:
    """Ends the trials' MLflow runs that their trial did not end (Tune stops a trial at its scheduler's decision,
    the last epoch included): FINISHED after every epoch, KILLED when stopped early, FAILED on an error; the reason
    as the tag ``sweep.ended``. Tune tears a trial down as soon as its scheduler decides (at its last epoch too), which
    can kill the trial's Train controller, whose run then ends FAILED with the teardown as the failure (or keeps only
    that failure tag when the trial dies before ending it): such a run takes the status the sweep saw (FINISHED or
    KILLED), without that failure."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_run(parent).info.experiment_id
    by_trial = {row["trial"]: row for row in rows}
    for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'"):
        row = by_trial.get(child.data.tags.get("sweep.trial", ""))
        reason = row["status"] if row else "the sweep ended"
        client.set_tag(child.info.run_id, "sweep.ended", reason)
        status = {"finished": "FINISHED", "error": "FAILED"}.get(reason, "KILLED")
        if child.info.status == "RUNNING" or (status != "FAILED" and child.info.status == "FAILED"):
            client.set_terminated(child.info.run_id, status)
            if status != "FAILED" and "failure" in child.data.tags:  # killed between its failure tag and its end
                client.delete_tag(child.info.run_id, "failure")


def run_sweep(spec: SweepSpec, *, root: Path) -> dict[str, Any]:
    """Runs the sweep; returns the best trial's overrides, its score and the parent MLflow run id."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from pipeline import cluster
    from pipeline.mlflow_adapter import artifact_location, git_commit, new_run, tracking_uri

    data = base_params(spec, root)  # the base + fixed params load, before anything runs
    base = build(Params, data)
    if spec.metric.startswith("val/") and not base.train.val_set:
        raise ParamsError(f"sweep {spec.name}: metric {spec.metric} needs validation, but train.val_set is empty")
    folder = (root / spec.out / spec.name).resolve()
    uri = tracking_uri(base.tracking, root)
    parent = new_run(uri, base.train.tracking.experiment, artifact_location(base.tracking, root), spec.name)
    parent.params({"sweep": {k: json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v
                             for k, v in to_dict(spec).items()}})
    parent.tags({"sweep": spec.name, "git_commit": git_commit(root), "stage": "sweep"})
    scope = "all" if base.train.keep == "best" else "last"
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=base.train.epochs,
                               grace_period=spec.scheduler.grace_period,
                               reduction_factor=spec.scheduler.reduction_factor)
                 if spec.scheduler.kind == "asha" else FIFOScheduler())
    class Progress(tune.Callback):
        """One line per trial epoch and per trial end (the trials' own progress bars are off)."""

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            log.info("trial %s epoch %s: %s %.4f", trial.trial_id, result.get("epoch"), spec.metric,
                     result.get(spec.metric, float("nan")))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log.info("trial %s ended at epoch %s", trial.trial_id, (trial.last_result or {}).get("epoch"))

    cluster.init()
    context = {"spec": to_dict(spec), "base": data, "root": str(root), "parent": parent.run_id, "folder": str(folder)}
    try:
        tuner = tune.Tuner(
            # a trial only drives its Ray Train controller, whose workers claim the CPUs / GPUs: it asks for a token
            # amount of memory (Tune refuses a trial that asks for nothing)
            tune.with_resources(tune.with_parameters(_trial, context=context), {"CPU": 0, "memory": 1}),
            param_space=_search_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                        num_samples=spec.samples, max_concurrent_trials=spec.concurrency),
            run_config=tune.RunConfig(name=spec.name, storage_path=str(folder / "tune"), verbose=0,
                                      callbacks=[Progress()]),
        )
        results = tuner.fit()
    except BaseException:
        parent.finish("KILLED")
        raise
    rows = _rows(results, spec, base.train.epochs, scope)
    _close_children(uri, parent.run_id, rows)
    if not rows or math.isnan(rows[0]["score"]):
        parent.finish("FAILED")
        raise InputError(f"sweep {spec.name}: no trial reported {spec.metric}"
                         + (f" (first error: {rows[0]['error']})" if rows and rows[0]["error"] else ""))
    best = rows[0]
    patch = nested({**spec.fixed, **best["overrides"]})
    text = table(rows, spec.metric)
    write_text(folder / "trials.md", text)
    write_text(folder / "best.yaml", f"# best of sweep {spec.name}: {spec.metric} {best['score']:.4f}; merge over "
               f"{', '.join(spec.params)}\n" + yaml.safe_dump(patch, sort_keys=True))
    _plot(rows, spec.metric, folder / "curves.png")
    for name in ("trials.md", "best.yaml", "curves.png"):
        parent.artifact(folder / name)
    parent.metrics({f"best/{spec.metric}": best["score"], "trials": len(rows),
                    "stopped_early": sum(r["status"].startswith("stopped") for r in rows)}, step=0)
    parent.finish()
    log.info("trials (%s, best first):\n%s", spec.metric, text)
    log.info("best overrides (%s):\n%s", folder / "best.yaml", yaml.safe_dump(patch, sort_keys=True).rstrip())
    ray.shutdown()
    return {"best": best["overrides"], "score": best["score"], "parent_run_id": parent.run_id, "rows": rows}


@clean_errors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("sweep", type=Path, help="sweep file (sweeps/*.yaml); it names its params files")
    p.add_argument("-v", "--verbose", action="store_true", help="show Ray's, MLflow's and the libraries' logs too")
    args = p.parse_args()
    setup_logging(args)
    run_sweep(load_spec(args.sweep), root=Path.cwd())


if __name__ == "__main__":
    import pipeline.sweep  # Ray pickles what __main__ defines by value: trials must import this module instead

    pipeline.sweep.main()
