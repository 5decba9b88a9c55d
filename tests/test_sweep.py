"""Sweeps: each sweep file's trials build valid params before anything runs (a typo fails here, not in a trial); a real
sweep on the demo shards (Ray Tune over the train stage's trainer, nested MLflow runs, ASHA)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from cs2fusion.config import ParamsError
from pipeline.sweep import _close_children, base_params, load_spec, nested, trial_params
from tests.conftest import REPO, RayHead
from tests.tiny import demo_params, stage

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_grid_point_of_a_sweep_file_builds_its_params(path: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each grid point's params build, with its overrides in place; a start checkpoint (from the base files or an
    override) is anchored to the repository, whatever the current folder (trials run in Tune's)."""
    monkeypatch.chdir(tmp_path)
    spec = load_spec(path)
    grids = {k: s["grid"] for k, s in spec.space.items() if "grid" in s}
    points = [dict(zip(grids, values)) for values in itertools.product(*grids.values())]
    assert points and spec.metric == "val/score"
    base = base_params(spec, REPO)
    for point in points:
        params = trial_params(base, point, "trial", "runs", REPO)
        assert params.train.resume == "never" and params.train.run_name == "trial"
        assert not params.train.init_from or Path(params.train.init_from).is_relative_to(REPO)
        for key, value in point.items():  # each override reached the params it names
            node = params
            for part in key.split("."):
                node = getattr(node, part)
            anchor = {"init_from": lambda v: str((REPO / v).resolve()) if v else v}
            if isinstance(value, dict):
                assert all(getattr(node, k) == anchor.get(k, lambda v: v)(v) for k, v in value.items())
            else:
                assert node == (tuple(value) if isinstance(value, list) else value)


def test_overrides_nest_and_merge_and_bad_searches_are_refused(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert nested({"train.loss": {"max_weight": 2}, "train.loss.grad_weight": 1, "model.map_spread": 0.5}) == {
        "train": {"loss": {"max_weight": 2, "grad_weight": 1}}, "model": {"map_spread": 0.5}}
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nspace: {train.lr_backbone: {range: [1, 2]}}\n")
    with pytest.raises(ParamsError, match="space.train.lr_backbone"):
        load_spec(bad)
    bad.write_text("name: x\nfixed: {train.loss.max_weigth: 1.0}\n")
    with pytest.raises(ParamsError, match="max_weigth"):
        base_params(load_spec(bad), REPO)


def test_closing_a_sweep_gives_torn_down_trials_the_status_the_sweep_saw(tmp_path: Path) -> None:
    """The closing pass over a real MLflow store, for each state Tune's teardown leaves a trial's run in: left
    RUNNING, left RUNNING with only its failure tag (killed between tag and end), ended FAILED by the teardown; an
    errored trial stays FAILED and a trial that ended its own run is untouched."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("x", artifact_location=(tmp_path / "a").as_uri())
    parent = client.create_run(experiment).info.run_id
    cases = {  # trial: (the sweep's row status, run status left, failure tag left) -> expected status
        "a": ("finished", "RUNNING", False, "FINISHED"), "b": ("finished", "RUNNING", True, "FINISHED"),
        "c": ("stopped after epoch 1", "FAILED", True, "KILLED"), "d": ("finished", "FAILED", True, "FINISHED"),
        "e": ("error", "FAILED", True, "FAILED"), "f": ("finished", "FINISHED", False, "FINISHED")}
    ids = {}
    for trial, (_, left, failed, _) in cases.items():
        run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "sweep.trial": trial}).info.run_id
        if failed:
            client.set_tag(run, "failure", "The actor died unexpectedly before finishing this task.")
        if left != "RUNNING":
            client.set_terminated(run, left)
        ids[trial] = run
    _close_children(client.tracking_uri, parent, [{"trial": t, "status": c[0]} for t, c in cases.items()])
    for trial, (reason, _, _, expected) in cases.items():
        run = client.get_run(ids[trial])
        assert (run.info.status, run.data.tags["sweep.ended"]) == (expected, reason), trial
        assert ("failure" in run.data.tags) == (expected == "FAILED"), trial


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.ray
def test_a_sweep_runs_trials_as_nested_runs_and_stops_the_worst_early(ray_head: RayHead, tmp_path: Path) -> None:
    """``pipeline.sweep`` on the demo shards (sweeps/demo.yaml, on the session's Ray head, its budget cut to two
    learning rates × 2 epochs of 2 steps, one trial at a time, ASHA): one parent MLflow run and 2 nested trial runs
    carrying their params and ``val/score``; the second trial (a rate that wrecks the fine-tune) scores below the first
    at epoch 1 and is stopped there; the table, the best overrides (printed and as a params patch) and the plot are
    written and logged."""

    data = tmp_path
    demo_params(data)
    params = yaml.safe_load((data / "params.yaml").read_text())
    params["train"].update(val_set="demo/test", keep="best")  # the quick start's validation (the metric)
    (data / "params.yaml").write_text(yaml.safe_dump(params))
    stage(data, "synth")
    stage(data, "prepare", "--out", "data/manifest.json")
    stage(data, "shard", "--manifest", "data/manifest.json", "--out", "data/shards")
    sweep = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    assert 0.05 in sweep["space"]["train.lr_backbone"]["grid"]
    sweep["space"]["train.lr_backbone"]["grid"] = [2e-4, 0.05]  # in this order: the wrecked one comes second
    sweep["concurrency"] = 1
    (data / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    proc = stage(data, "sweep", "sweep.yaml", timeout=900, RAY_ADDRESS=ray_head.address)
    folder = data / "sweeps" / "results" / "demo-lr"
    assert "best overrides" in proc.stderr and "lr_backbone: 0.05" not in proc.stderr.split("best overrides")[1]
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cs2fusion-demo").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.info.status == "FINISHED"
    by_lr = {float(r.data.params["train.lr_backbone"]): r for r in children}
    assert sorted(by_lr) == [2e-4, 0.05] and all("val/score" in r.data.metrics for r in children)
    kept, wrecked = by_lr[2e-4], by_lr[0.05]
    assert wrecked.info.status == "KILLED" and wrecked.data.tags["sweep.ended"] == "stopped after epoch 1"
    assert "failure" not in wrecked.data.tags  # its teardown (the controller killed mid-epoch) is not a failure
    assert [m.step for m in client.get_metric_history(wrecked.info.run_id, "val/score")] == [1]
    assert kept.info.status == "FINISHED" and kept.data.tags["sweep.ended"] == "finished"
    assert "failure" not in kept.data.tags  # torn down at its last epoch: not a failure either
    assert [m.step for m in client.get_metric_history(kept.info.run_id, "val/score")] == [1, 2]
    assert wrecked.data.metrics["val/score"] < kept.data.metrics["val/score"]
    table = (folder / "trials.md").read_text()
    assert table.count("\n") == 4 and "stopped after epoch 1" in table.splitlines()[-1]
    assert yaml.safe_load((folder / "best.yaml").read_text())["train"]["lr_backbone"] == 2e-4
    assert (folder / "curves.png").stat().st_size > 0
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.md", "best.yaml", "curves.png"} <= artifacts
