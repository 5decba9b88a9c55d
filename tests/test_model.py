"""Model anatomy: parameter counts, any H×W, branch keywords, per-sample independence, input scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cs2fusion.config import ModelParams
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.model.cpn import minmax, robust_minmax


def test_parameter_counts_match_release() -> None:
    assert sum(p.numel() for p in Backbone().parameters()) == 191_732
    assert sum(p.numel() for p in CompensationPerceptionNetwork().parameters()) == 74_369


@pytest.mark.parametrize("hw", [(1, 1), (7, 13), (33, 17), (64, 48)])
def test_any_size(hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    net, cpn = Backbone(), CompensationPerceptionNetwork()
    vis, ir = torch.rand(2, 1, *hw), torch.rand(2, 1, *hw)
    out = net(vis_y=vis, ir=ir)
    assert out.fused.shape == (2, 1, *hw)
    assert all(e.shape == (2, 16, *hw) for e in (*out.vis, *out.ir))
    c = cpn(ir=out.ir, vis=out.vis)
    assert c.w_ir.shape == (2, 1, *hw)
    assert torch.allclose(c.w_ir + c.w_vis, torch.ones_like(c.w_ir))
    assert 0 <= c.w_ir.min() and c.w_ir.max() <= 1
    assert c.map_ir.shape == c.sso_ir.shape == (2, 64 * hw[0] * hw[1])


def test_branches_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Backbone()(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))  # type: ignore[misc]


def test_branches_are_not_symmetric() -> None:
    torch.manual_seed(0)
    net = Backbone()
    a, b = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    assert not torch.allclose(net(vis_y=a, ir=b).fused, net(vis_y=b, ir=a).fused)


def test_input_scale_applied_inside() -> None:
    """Same weights: input_scale 255 on [0, 1] data equals input_scale 1 on the same data × 255, scaled back.
    The network is not scale-invariant (biases, LeakyReLU's slope), so this fails if either model ignores its
    input_scale on the way in or out."""
    torch.manual_seed(0)
    net = Backbone()
    raw = Backbone(ModelParams(input_scale=1.0))
    raw.load_state_dict(net.state_dict())
    a, b = torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12)
    torch.testing.assert_close(net(vis_y=a, ir=b).fused * 255, raw(vis_y=a * 255, ir=b * 255).fused)
    assert not torch.allclose(net(vis_y=a, ir=b).fused, raw(vis_y=a, ir=b).fused, atol=1e-3)


@pytest.mark.parametrize("scope, independent", [("sample", True), ("batch", False)])
def test_cpn_sample_independent_of_batch(scope: str, independent: bool) -> None:
    torch.manual_seed(0)
    params = ModelParams(norm_scope=scope)
    net, cpn = Backbone(params), CompensationPerceptionNetwork(params)
    vis, ir = torch.rand(3, 1, 10, 10), torch.rand(3, 1, 10, 10)
    vis[2] *= 0.1  # a very different batch neighbour
    out = net(vis_y=vis, ir=ir)
    alone = net(vis_y=vis[:1], ir=ir[:1])
    w_batch = cpn(ir=out.ir, vis=out.vis).w_ir[:1]
    w_alone = cpn(ir=alone.ir, vis=alone.vis).w_ir
    assert torch.allclose(w_batch, w_alone, atol=1e-6) == independent


@pytest.mark.parametrize("scope", ["sample", "batch"])
def test_robust_map_is_not_set_by_a_few_pixels(scope: str) -> None:
    """A map at its top almost everywhere with a few pixels far below: min-max puts ~all of it at 1 (the saturation
    that makes the full recipe copy one source); the robust normalisation keeps its mean near 0.5, still in [0, 1]
    and still ordered like the input."""
    x = torch.ones(2, 1, 20, 20)
    x[:, :, :2, :2] = -3.0                   # 1 % of the pixels
    x = x + 0.01 * torch.randn_like(x)
    assert float(minmax(x, scope).mean()) > 0.95
    robust = robust_minmax(x, scope)
    assert 0.4 < float(robust.mean()) < 0.6
    assert float(robust.min()) >= 0.0 and float(robust.max()) <= 1.0
    for xs, rs in zip(x.flatten(1), robust.flatten(1)):
        assert bool((rs[xs.argsort()].diff() >= 0).all())


@pytest.mark.parametrize(("spread", "top"), [(2.0, 0.75), (1.0, 1.0)])
def test_robust_map_of_a_two_level_input(spread: float, top: float) -> None:
    """A map that is one of two values (half the pixels each): its std is half the gap, so mean ± 2 std spans only
    0.25–0.75 and mean ± 1 std (``robust_tight``) 0–1, as min-max does (up to the unbiased std's √(n/(n−1)))."""
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4] = 3.0
    w = robust_minmax(x, "sample", spread=spread)
    shrink = (63 / 64) ** 0.5
    assert float(w[..., :4].mean()) == pytest.approx(0.5 + (top - 0.5) * shrink, abs=1e-6)
    assert float(w[..., 4:].mean()) == pytest.approx(0.5 - (top - 0.5) * shrink, abs=1e-6)


def test_sharp_robust_map_saturates_most_pixels() -> None:
    """Mean ± 0.5 std (``map_spread: 0.5``): a two-level map becomes exactly 0 and 1, and on a Gaussian map the pixels
    beyond ± 0.5 std (~62 %) are clamped to 0 or 1, where ± 1 std clamps ~32 %."""
    x = torch.zeros(1, 1, 8, 8)
    x[..., :4] = 3.0
    w = robust_minmax(x, "sample", spread=0.5)
    assert bool((w[..., :4] == 1.0).all()) and bool((w[..., 4:] == 0.0).all())
    g = torch.randn(1, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    for spread, share in ((0.5, 0.62), (1.0, 0.32)):
        m = robust_minmax(g, "batch", spread=spread)
        assert float(((m == 0) | (m == 1)).float().mean()) == pytest.approx(share, abs=0.01)


def test_cpn_map_norm_choice() -> None:
    """``model.map_norm`` picks how the CPN's estimator output becomes the map; the release's min-max is the default."""
    torch.manual_seed(0)
    vis, ir = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    assert ModelParams().map_norm == "minmax"
    for norm, spread, normalise in (("minmax", 2.0, minmax), ("robust", 2.0, robust_minmax),
                                    ("robust", 1.0, lambda x, scope: robust_minmax(x, scope, spread=1.0))):
        params = ModelParams(map_norm=norm, map_spread=spread)
        torch.manual_seed(1)
        net, cpn = Backbone(params), CompensationPerceptionNetwork(params)
        out = net(vis_y=vis, ir=ir)
        h = F.leaky_relu(cpn.conv(torch.cat([out.ir.stacked(), out.vis.stacked()], dim=1)), params.negative_slope)
        torch.testing.assert_close(cpn(ir=out.ir, vis=out.vis).w_ir, normalise(cpn.estimator(h), params.norm_scope))
