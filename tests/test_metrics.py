"""Every metric against the field's reference evaluator (golden values on real images), plus input checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cs2fusion.io import read_image
from cs2fusion.metrics import ALL_METRICS, all_metrics, entropy, grey_like_reference, mutual_information
from tests.conftest import GOLDEN, RS40

GOLD = json.loads((GOLDEN / "cs2fusion_roadscene40.json").read_text())


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
@pytest.mark.parametrize("method", ["published", "mean", "max"])
def test_every_metric_matches_reference(method: str) -> None:
    gold = GOLD["methods"][method]["images"]
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
