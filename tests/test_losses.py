"""Losses: hand-checked values and the parameter partition (each loss trains only its own network)."""

from __future__ import annotations

import math

import numpy as np
import torch

from cs2fusion.config import ImpairParams
from cs2fusion.data.impair import impair
from cs2fusion.losses import backbone_loss, contrastive_loss, cosine_matrix, sim_max_loss, sim_min_loss
from cs2fusion.model import Backbone, CompensationPerceptionNetwork


def test_cosine_matrix_clamped() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    sim = cosine_matrix(x, x)
    assert sim[0, 0] == 0.9995 and sim[0, 1] == 0.0005 and sim[0, 2] == 0.0005


def test_sim_max_hand_computed() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    # row 0: sims [0.9995, 0.0005] ranks -1, 0; row 1: [c, c] ranks -1, 0 (stable order)
    expected = (
        -math.log(0.9995) * math.exp(0.25) - math.log(0.0005) - math.log(c) * math.exp(0.25) - math.log(c)
    ) / 4
    assert math.isclose(sim_max_loss(x, y, alpha=0.25).item(), expected, rel_tol=1e-5)


def test_sim_min_hand_computed() -> None:
    x = torch.tensor([[1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (-math.log(1 - 0.9995) - math.log(1 - 0.0005)) / 2
    assert math.isclose(sim_min_loss(x, y).item(), expected, rel_tol=1e-5)


def _losses(seed: int = 0) -> tuple[Backbone, CompensationPerceptionNetwork, dict, dict]:
    torch.manual_seed(seed)
    net, cpn = Backbone(), CompensationPerceptionNetwork()
    vis, ir = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    rng = np.random.default_rng(seed)
    vis_imp = torch.from_numpy(np.stack([impair(v.numpy(), rng, ImpairParams()) for v in vis]))
    out = net(vis_y=vis, ir=ir)
    main = cpn(ir=out.ir, vis=out.vis)
    out2 = net(vis_y=vis_imp, ir=ir)
    imp = cpn(ir=out2.ir, vis=out2.vis)
    lb = backbone_loss(out.fused, ir=ir, vis_y=vis, w_ir=main.w_ir, w_vis=main.w_vis, scale=255.0)
    lc = contrastive_loss(main, impaired_sso_ir=imp.sso_ir, impaired_sso_vis=imp.sso_vis, alpha=0.25,
                          impaired_weight=2.0)
    return net, cpn, lb, lc


def _grads(module: torch.nn.Module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def test_backbone_loss_trains_backbone_only() -> None:
    net, cpn, lb, _ = _losses()
    lb["backbone"].backward()
    assert all(_grads(net).values()), [n for n, g in _grads(net).items() if not g]
    assert not any(_grads(cpn).values())


def test_contrastive_loss_trains_cpn_only() -> None:
    net, cpn, _, lc = _losses()
    lc["cpn"].backward()
    assert all(_grads(cpn).values())
    assert not any(_grads(net).values())


def test_loss_terms_add_up() -> None:
    _, _, lb, lc = _losses()
    parts = lb["intensity_ir"] + lb["intensity_vis"] + lb["ssim_ir"] + lb["ssim_vis"]
    torch.testing.assert_close(lb["backbone"], parts)
    torch.testing.assert_close(lc["cpn"], lc["contrast_1"] + 2.0 * lc["contrast_2"])


def test_impair_cuts_regions(rng: np.random.Generator) -> None:
    img = np.full((50, 80), 200, dtype=np.uint8)
    out = impair(img, rng, ImpairParams(regions=2, min_frac=0.2, max_frac=0.3, fill=0.0))
    assert img.min() == 200  # input untouched
    cut = (out == 0).mean()
    assert 0.04 * 0.5 <= cut <= 2 * 0.09
    again = impair(img, np.random.default_rng(0), ImpairParams(regions=2, min_frac=0.2, max_frac=0.3))
    assert np.array_equal(out, again)
