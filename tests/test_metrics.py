"""Every metric against the field's reference evaluator (golden values on real images), plus input checks."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from cs2fusion.io import read_image
from cs2fusion.metrics import ALL_METRICS, all_metrics, entropy, grey_like_reference, mutual_information
from tests.conftest import DATA, GOLDEN, RS40



@functools.cache
def golden() -> dict:
    return json.loads((GOLDEN / "cs2fusion_roadscene40.json").read_text())


def method_image(method: str, i: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(F, ir, vi) as the reference evaluator saw them (grey float, integer values)."""
    ir = grey_like_reference(read_image(RS40 / "ir" / f"{i}.png"))
    vi = grey_like_reference(read_image(RS40 / "vi" / f"{i}.png"))
    if method == "published":
        fused = grey_like_reference(read_image(RS40 / "fused_published" / f"{i}.png"))
    elif method == "mean":
        fused = np.floor((ir + vi) / 2 + 0.5)
    elif method == "max":
        fused = np.maximum(ir, vi)
    else:
        raise KeyError(method)
    return fused, ir, vi


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize("method", ["published", "mean", "max"])
def test_every_metric_matches_reference(method: str) -> None:
    gold = golden()["methods"][method]["images"]
    assert len(gold) == 40
    worst: dict[str, float] = {}
    for i, expected in gold.items():
        got = all_metrics(*method_image(method, i))
        for name in ALL_METRICS:
            rel = abs(got[name] - expected[name]) / max(abs(expected[name]), 1e-12)
            worst[name] = max(worst.get(name, 0.0), rel)
    assert all(v <= 1e-3 for v in worst.values()), worst


def test_input_validation() -> None:
    with pytest.raises(ValueError):
        entropy(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError):
        mutual_information(np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        entropy(np.full((4, 4), 300.0))


def test_entropy_and_mi_hand_values() -> None:
    half = np.array([[0, 0], [255, 255]], dtype=np.uint8)
    assert entropy(half) == pytest.approx(1.0)
    # F identical to both sources: MI = 2 · H in nats
    assert mutual_information(half, half, half) == pytest.approx(2 * np.log(2))


@pytest.mark.slow
@pytest.mark.data
def test_evaluation_of_published_weights_reproduces_golden_means(published_fused_rs40, tmp_path) -> None:
    """The evaluate stage's library path on our fusion of the 40 pairs with the published weights."""
    from cs2fusion.config import DatasetSpec, PrepareParams, ShardParams
    from cs2fusion.data.manifest import build_manifest
    from cs2fusion.data.shards import set_files, write_shards
    from cs2fusion.evaluation import evaluate_set, summarize

    manifest = build_manifest(PrepareParams(datasets=(DatasetSpec(name="rs40", root=str(RS40)),)))
    write_shards(manifest, ShardParams(eval=("rs40/test",)), tmp_path / "shards")
    rows = evaluate_set("rs40/test", set_files(tmp_path / "shards", "rs40/test"), {"published": published_fused_rs40})
    summary = summarize(rows)["rs40/test"]
    assert summary["published"]["n"] == 40
    for method in ("mean", "max"):  # computed from the sources: exact
        for name in ALL_METRICS:
            gold = golden()["methods"][method]["mean"][name]
            assert summary[method][name] == pytest.approx(gold, rel=1e-3), (method, name)
    # our port decodes the source JPEGs' PNGs, the authors another decoder: outputs differ by 0.023 grey levels
    # on average, which moves the means by far less than 0.5 %
    for name in ALL_METRICS:
        gold = golden()["methods"]["published"]["mean"][name]
        assert summary["published"][name] == pytest.approx(gold, rel=5e-3), name


@pytest.mark.data
def test_metrics_over_processes_are_the_same_numbers(tmp_path) -> None:
    """``evaluate_pairs`` spread over 2 processes gives the very rows one process gives, in the pairs' order: two
    published methods' outputs on 4 TNO-40 pairs, and the baselines."""
    from cs2fusion.data.pairs import find_pairs, load_pair
    from cs2fusion.evaluation import evaluate_pairs

    pairs = find_pairs(DATA / "tno40" / "ir", DATA / "tno40" / "vi")[:4]
    methods = {m: DATA / "peers" / "tno40" / m for m in ("DenseFuse", "SeAFusion")}

    def rows(workers: int) -> list[dict]:
        return evaluate_pairs("tno40", ((p.id, *load_pair(p)) for p in pairs), methods, total=len(pairs),
                              workers=workers)

    one = rows(1)
    assert [(r["id"], r["method"]) for r in one] == [(p.id, m) for p in pairs
                                                     for m in ("DenseFuse", "SeAFusion", "mean", "max")]
    assert rows(2) == one


def test_leaderboard_ranks_ties_and_mean_ranks_on_a_hand_made_table() -> None:
    """Four methods × three metrics, with ties: equal values share the best of their ranks (1, 1, 3, 4), every
    method ties on Z, and equal mean ranks are ordered by name."""
    from cs2fusion.evaluation import leaderboard, leaderboard_table

    table = {"A": {"X": 3.0, "Y": 1.0, "Z": 5.0}, "B": {"X": 3.0, "Y": 2.0, "Z": 5.0},
             "C": {"X": 1.0, "Y": 3.0, "Z": 5.0}, "D": {"X": 2.0, "Y": 3.0, "Z": 5.0}}
    rows = leaderboard(table, ["X", "Y", "Z"])
    ranks = {r["method"]: (r["rank/X"], r["rank/Y"], r["rank/Z"]) for r in rows}
    assert ranks == {"A": (1, 4, 1), "B": (1, 3, 1), "C": (4, 1, 1), "D": (3, 1, 1)}
    assert [(r["method"], r["mean_rank"]) for r in rows] == [("B", pytest.approx(5 / 3)), ("D", pytest.approx(5 / 3)),
                                                              ("A", 2.0), ("C", 2.0)]
    lines = leaderboard_table(rows, ["X", "Y", "Z"]).splitlines()
    assert lines[0] == "| # | method | X | Y | Z | mean rank |"
    assert lines[2] == "| 1 | B | **3 (1)** | 2 (3) | **5 (1)** | 1.67 |"
    assert lines[5] == "| 4 | C | 1 (4) | **3 (1)** | **5 (1)** | 2.00 |"
