"""The published weights through our model reproduce the paper's float outputs and its released PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.color import rgb_to_grey
from cs2fusion.inference import Fuser
from cs2fusion.io import read_image
from tests.conftest import PUBLISHED, RS40

pytestmark = pytest.mark.data  # real pairs from ../shared


def test_fused_y_matches_reference_exactly(published_ckpt: Path) -> None:
    ref = np.load(PUBLISHED / "fused_y_reference.npz")
    fuser = Fuser(load_checkpoint(published_ckpt).backbone)
    assert len(ref.files) == 8
    for key in ref.files:
        vis_y = rgb_to_grey(read_image(RS40 / "vi" / f"{key}.png"))
        ir = read_image(RS40 / "ir" / f"{key}.png").astype(np.float32)
        fused = fuser.fuse_y(vis_y=vis_y, ir=ir)
        assert np.abs(fused - ref[key]).max() <= 1e-3, key


@pytest.mark.slow
def test_cli_reproduces_published_outputs(published_fused_rs40: Path) -> None:
    tmp_path = published_fused_rs40
    total_abs, total_within, total_n = 0.0, 0, 0
    ids = sorted(p.stem for p in (RS40 / "fused_published").glob("*.png"))
    assert len(ids) == 40
    for i in ids:
        ours = read_image(tmp_path / f"{i}.png").astype(np.int16)
        theirs = read_image(RS40 / "fused_published" / f"{i}.png").astype(np.int16)
        assert ours.shape == theirs.shape == (*theirs.shape[:2], 3), i
        diff = np.abs(ours - theirs)
        within = float((diff <= 1).mean())
        assert within >= 0.975, f"{i}: only {within:.4f} within ±1"
        total_abs += float(diff.sum())
        total_within += int((diff <= 1).sum())
        total_n += diff.size
    assert total_abs / total_n <= 0.03
    assert total_within / total_n >= 0.994
