"""Random crops of registered pairs with their impaired views: one fixed batch for tests, benchmarks and short
experiments (the train stage streams shards instead)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cs2fusion.config import ImpairParams
from cs2fusion.data.impair import impair
from cs2fusion.io import read_grey


def random_crops(root: str | Path, ids: Sequence[str], *, count: int, patch: int, rng: np.random.Generator,
                 impair_params: ImpairParams = ImpairParams()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``patch``² crops of ``count`` distinct pairs ``<root>/{ir,vi}/<id>.png`` drawn by ``rng``, one each:
    (infrared, visible Y, impaired visible Y), each (count, 1, patch, patch) float in [0, 1]."""
    irs, vis, imps = [], [], []
    for pid in rng.choice(list(ids), count, replace=False):
        ir, vi = (read_grey(Path(root) / kind / f"{pid}.png") for kind in ("ir", "vi"))
        top, left = rng.integers(ir.shape[0] - patch + 1), rng.integers(ir.shape[1] - patch + 1)
        irs.append(ir[top:top + patch, left:left + patch])
        vis.append(vi[top:top + patch, left:left + patch])
        imps.append(impair(vis[-1], rng, impair_params))
    return tuple(torch.from_numpy(np.stack(a).astype(np.float32) / 255)[:, None] for a in (irs, vis, imps))
