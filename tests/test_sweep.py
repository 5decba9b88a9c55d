"""Sweep files: each one's trials build valid params before anything runs (a typo fails here, not in a trial)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from cs2fusion.config import ParamsError
from pipeline.sweep import base_params, load_spec, nested, trial_params
from tests.conftest import REPO

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_grid_point_of_a_sweep_file_builds_its_params(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    spec = load_spec(path)
    grids = {k: s["grid"] for k, s in spec.space.items() if "grid" in s}
    points = [dict(zip(grids, values)) for values in itertools.product(*grids.values())]
    assert points and spec.metric == "val/score"
    base = base_params(spec, REPO)
    for point in points:
        params = trial_params(base, point, "trial", "runs")
        assert params.train.resume == "never" and params.train.run_name == "trial"
        for key, value in point.items():  # each override reached the params it names
            node = params
            for part in key.split("."):
                node = getattr(node, part)
            if isinstance(value, dict):
                assert all(getattr(node, k) == v for k, v in value.items())
            else:
                assert node == (tuple(value) if isinstance(value, list) else value)


def test_overrides_nest_and_merge_and_bad_searches_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
