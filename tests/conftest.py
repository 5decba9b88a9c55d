"""Shared fixtures: the real data in ../shared, the imported published weights, small tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CS2FUSION_SHARED", REPO.parent / "shared")).resolve()
DATA = SHARED / "data"
PUBLISHED = SHARED / "reference" / "cs2fusion-published"
GOLDEN = SHARED / "reference" / "metrics-golden"
RS40 = DATA / "cs2fusion_roadscene40"


def pytest_sessionstart(session: pytest.Session) -> None:
    if not (DATA / "MANIFEST.md").is_file():
        raise pytest.UsageError(f"real data not found at {SHARED} (set CS2FUSION_SHARED)")


@pytest.fixture(scope="session")
def published_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The release's weights imported through ``cs2fusion import-published``."""
    from typer.testing import CliRunner

    from cs2fusion.cli import app

    out = tmp_path_factory.mktemp("published") / "published.safetensors"
    result = CliRunner().invoke(app, ["import-published", str(PUBLISHED), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def published_fused_rs40(published_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``cs2fusion fuse`` with the imported published weights over the paper's 40 RoadScene test pairs."""
    from typer.testing import CliRunner

    from cs2fusion.cli import app

    out = tmp_path_factory.mktemp("published_fused")
    result = CliRunner().invoke(app, ["fuse", "--model", str(published_ckpt), "--ir", str(RS40 / "ir"),
                                      "--vi", str(RS40 / "vi"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
