"""Losses: hand-checked values and the parameter partition (each loss trains only its own network)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cs2fusion.config import ImpairParams, ModelParams, TrainParams
from cs2fusion.data.impair import impair
from cs2fusion.losses import (STD_EPS, backbone_loss, contrastive_loss, cosine_matrix, local_std, sim_max_loss,
                              sim_min_loss, sobel_magnitude)
from cs2fusion.model import Backbone, CompensationPerceptionNetwork
from cs2fusion.training import build_state, train_step


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


def test_train_step_partitions_the_losses() -> None:
    """Through ``train_step`` itself (its impaired pass, its two backward passes): the backbone loss reaches every
    backbone parameter and no CPN parameter; the CPN loss reaches every CPN parameter and leaves the backbone's
    gradients as they were."""
    torch.manual_seed(0)
    train = TrainParams(batch_size=4)
    state = build_state(ModelParams(), train)
    vis, ir = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    rng = np.random.default_rng(0)
    vis_imp = torch.from_numpy(np.stack([impair(v.numpy(), rng, ImpairParams()) for v in vis]))
    seen = {}

    def snapshot(name: str, step):  # noqa: ANN001
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003
            seen[name] = {net: {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
                          for net, module in (("backbone", state.backbone), ("cpn", state.cpn))}
            return step(*args, **kwargs)
        return wrapped

    state.opt_backbone.step = snapshot("backbone step", state.opt_backbone.step)
    state.opt_cpn.step = snapshot("cpn step", state.opt_cpn.step)
    train_step(state, (ir, vis, vis_imp), train)
    first, second = seen["backbone step"], seen["cpn step"]
    assert all(g is not None and g.abs().sum() > 0 for g in first["backbone"].values())
    assert all(g is None for g in first["cpn"].values())
    assert all(g is not None and g.abs().sum() > 0 for g in second["cpn"].values())
    for name, g in second["backbone"].items():
        assert torch.equal(g, first["backbone"][name]), name


def test_backbone_loss_hand_computed() -> None:
    """Constant images, maps of ones: the intensity terms are Frobenius norms over the batch on 0–255, the SSIM
    terms (1 − SSIM) / 2 of two constants with kornia's C1 = (0.01 · max_val)² and max_val 1."""
    f, a, b = (torch.full((2, 1, 8, 8), v) for v in (0.5, 0.25, 0.75))
    ones = torch.ones_like(f)
    lb = backbone_loss(f, ir=a, vis_y=b, w_ir=ones, w_vis=0.5 * ones, scale=255.0)
    n = f.numel()
    assert lb["intensity_ir"].item() == pytest.approx(math.sqrt(n) * 0.25 * 255, rel=1e-6)
    assert lb["intensity_vis"].item() == pytest.approx(math.sqrt(n) * 0.25 * 255 * 0.5, rel=1e-6)

    def ssim_loss_const(x: float, y: float) -> float:
        c1 = 1e-4
        return (1 - (2 * x * y + c1) / (x * x + y * y + c1)) / 2

    assert lb["ssim_ir"].item() == pytest.approx(ssim_loss_const(127.5, 63.75), rel=1e-4)
    assert lb["ssim_vis"].item() == pytest.approx(ssim_loss_const(127.5, 191.25), rel=1e-4)
    total = sum(lb[k].item() for k in ("intensity_ir", "intensity_vis", "ssim_ir", "ssim_vis"))
    assert lb["backbone"].item() == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("intensity", ["norm", "mse"])
def test_what_the_intensity_terms_pull_the_fusion_to(intensity: str) -> None:
    """Free fused pixels under the intensity terms alone, maps 0.6 (IR) / 0.4 (visible) everywhere: the release's
    unsquared norms end at a copy of the IR image (the more weighted source: a two-point Fermat–Weber problem);
    ``mse`` ends at the per-pixel weighted mean (0.36·ir + 0.16·vis) / 0.52. Why the full recipe copies a source."""
    gen = torch.Generator().manual_seed(0)
    ir, vis = torch.rand(2, 1, 16, 16, generator=gen), torch.rand(2, 1, 16, 16, generator=gen)
    fused = ((ir + vis) / 2).requires_grad_()
    opt = torch.optim.Adam([fused], lr=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [200, 400], gamma=0.1)
    for _ in range(600):
        lb = backbone_loss(fused, ir=ir, vis_y=vis, w_ir=torch.full_like(ir, 0.6), w_vis=torch.full_like(ir, 0.4),
                           scale=255.0, intensity=intensity)
        opt.zero_grad()
        (lb["intensity_ir"] + lb["intensity_vis"]).backward()
        opt.step()
        sched.step()
    want = ir if intensity == "norm" else (0.36 * ir + 0.16 * vis) / 0.52
    assert float((fused.detach() - want).abs().max()) < 0.01


def test_l1_intensity_selects_the_more_weighted_source_per_pixel() -> None:
    """Free fused pixels under the ``l1`` intensity terms alone, the IR map 0.6 on the left half and 0.4 on the right:
    the fusion ends at the IR image on the left and the visible image on the right (a per-pixel selection, where
    ``norm`` copies one source everywhere and ``mse`` blends)."""
    gen = torch.Generator().manual_seed(1)
    ir, vis = torch.rand(2, 1, 16, 16, generator=gen), torch.rand(2, 1, 16, 16, generator=gen)
    w_ir = torch.full_like(ir, 0.4)
    w_ir[..., :8] = 0.6
    fused = ((ir + vis) / 2).requires_grad_()
    opt = torch.optim.Adam([fused], lr=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [200, 400], gamma=0.1)
    for _ in range(600):
        lb = backbone_loss(fused, ir=ir, vis_y=vis, w_ir=w_ir, w_vis=1 - w_ir, scale=255.0, intensity="l1")
        opt.zero_grad()
        (lb["intensity_ir"] + lb["intensity_vis"]).backward()
        opt.step()
        sched.step()
    want = torch.where(w_ir > 0.5, ir, vis)
    assert float((fused.detach() - want).abs().max()) < 0.01


def test_max_term_takes_the_brighter_source_where_the_map_is_undecided() -> None:
    """With the map at 0.5 everywhere the ``l1`` terms are flat between the sources; the max-intensity term (μ 0.5)
    moves free fused pixels to the brighter source; at μ 0 the term is absent, and μ adds μ times it to the total."""
    gen = torch.Generator().manual_seed(3)
    ir, vis = torch.rand(2, 1, 16, 16, generator=gen), torch.rand(2, 1, 16, 16, generator=gen)
    half = torch.full_like(ir, 0.5)
    fused = ((ir + vis) / 2).requires_grad_()
    opt = torch.optim.Adam([fused], lr=1e-2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [200, 400], gamma=0.1)
    for _ in range(600):
        lb = backbone_loss(fused, ir=ir, vis_y=vis, w_ir=half, w_vis=half, scale=255.0, intensity="l1",
                           max_weight=0.5)
        opt.zero_grad()
        (lb["intensity_ir"] + lb["intensity_vis"] + 0.5 * lb["intensity_max"]).backward()
        opt.step()
        sched.step()
    assert float((fused.detach() - torch.maximum(ir, vis)).abs().max()) < 0.01
    f, a, b, w = ((ir + vis) / 2).double(), ir.double(), vis.double(), half.double()
    off, on = (backbone_loss(f, ir=a, vis_y=b, w_ir=w, w_vis=w, scale=255.0, intensity="l1", max_weight=mu)
               for mu in (0.0, 2.0))
    assert on["intensity_max"].item() > 10
    assert "intensity_max" not in off
    assert (on["backbone"] - off["backbone"]).item() == pytest.approx(2.0 * on["intensity_max"].item(), rel=1e-5)


def test_sobel_magnitude_of_ramps() -> None:
    """Unnormalised Sobel: a ramp of slope s along either axis gives |∇| = 8·s inside, a flat image 0."""
    u = torch.arange(12, dtype=torch.float64)
    ramp_x, ramp_y = (3 * u).expand(12, 12)[None, None], (-2 * u)[:, None].expand(12, 12)[None, None]
    assert torch.allclose(sobel_magnitude(ramp_x)[..., 1:-1, 1:-1], torch.full((10, 10), 24.0, dtype=torch.float64))
    assert torch.allclose(sobel_magnitude(ramp_y)[..., 1:-1, 1:-1], torch.full((10, 10), 16.0, dtype=torch.float64))
    assert sobel_magnitude(torch.full((1, 1, 8, 8), 7.0)).abs().max().item() == 0


def test_gradient_term_keeps_the_stronger_edges_of_either_source() -> None:
    """The max-gradient term (γ) is small for an output with the infrared's edge in the upper half and the visible's
    texture in the lower (the union of the sources' edges), large for their average, which halves both, and for a
    copy of either; γ adds γ times it to the total, and at γ 0 it is absent."""
    gen = torch.Generator().manual_seed(4)
    ir, vis = torch.zeros(2, 1, 1, 16, 16, dtype=torch.float64)
    ir[..., :8, 8:] = 1.0
    vis[..., 8:, :] = torch.rand(8, 16, generator=gen, dtype=torch.float64)
    union, w = ir + vis, torch.full_like(ir, 0.5)
    kwargs = dict(ir=ir, vis_y=vis, w_ir=w, w_vis=w, scale=255.0, intensity="l1")
    keep, blur, off = (backbone_loss(f, grad_weight=g, **kwargs)
                       for f, g in ((union, 2.0), ((ir + vis) / 2, 2.0), (union, 0.0)))
    assert blur["gradient_max"].item() > 100
    assert blur["gradient_max"].item() > 5 * keep["gradient_max"].item()
    for copy in (ir, vis):  # a copy of one source loses the other's edges
        assert backbone_loss(copy, grad_weight=2.0, **kwargs)["gradient_max"].item() > 4 * keep["gradient_max"].item()
    assert "gradient_max" not in off
    assert (keep["backbone"] - off["backbone"]).item() == pytest.approx(2.0 * keep["gradient_max"].item(), rel=1e-6)


def test_local_std_matches_a_direct_count() -> None:
    """σ over a 3×3 box: an edge between 0 and 2 gives √(8/9 + ε) beside it (two 0 columns and one 2), √ε on flat
    ground; on a random image every pixel's value is the population std of its reflected 5×5 neighbourhood."""
    step = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    step[..., 3:] = 2.0
    std = local_std(step, 3)[0, 0]
    assert torch.allclose(std[:, 2], torch.full((6,), (8 / 9 + STD_EPS) ** 0.5, dtype=torch.float64))
    assert torch.allclose(std[:, 0], torch.full((6,), STD_EPS ** 0.5, dtype=torch.float64))
    x = torch.rand(1, 1, 7, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 255
    padded = np.pad(x[0, 0].numpy(), 2, mode="reflect")
    direct = np.array([[np.sqrt(padded[i:i + 5, j:j + 5].var() + STD_EPS) for j in range(9)] for i in range(7)])
    np.testing.assert_allclose(local_std(x, 5)[0, 0].numpy(), direct, rtol=1e-10)


def test_contrast_term_keeps_each_sources_local_contrast() -> None:
    """The local-contrast term (κ) is small for an output carrying the infrared's block in the upper half and the
    visible texture in the lower (each region's σ is its source's), large for their average, which halves both, and
    for a copy of either; κ adds κ times it to the total; at κ 0 it is absent; its gradient is finite on flat ground."""
    gen = torch.Generator().manual_seed(6)
    ir, vis = torch.zeros(2, 1, 1, 32, 32, dtype=torch.float64)
    ir[..., 4:12, 20:28] = 1.0
    vis[..., 20:, :] = torch.rand(12, 32, generator=gen, dtype=torch.float64)
    union, w = ir + vis, torch.full_like(ir, 0.5)
    kwargs = dict(ir=ir, vis_y=vis, w_ir=w, w_vis=w, scale=255.0, intensity="l1", contrast_window=5)
    keep, blur, off = (backbone_loss(f, contrast_weight=k, **kwargs)
                       for f, k in ((union, 3.0), ((ir + vis) / 2, 3.0), (union, 0.0)))
    assert blur["contrast_max"].item() > 10
    assert blur["contrast_max"].item() > 5 * keep["contrast_max"].item()
    for copy in (ir, vis):
        copied = backbone_loss(copy, contrast_weight=3.0, **kwargs)["contrast_max"].item()
        assert copied > 4 * keep["contrast_max"].item()
    assert "contrast_max" not in off
    assert (keep["backbone"] - off["backbone"]).item() == pytest.approx(3.0 * keep["contrast_max"].item(), rel=1e-6)
    for start in (torch.zeros_like(ir), 1e-4 * torch.rand(ir.shape, generator=gen, dtype=torch.float64)):
        flat = start.requires_grad_()
        backbone_loss(flat, contrast_weight=3.0, **kwargs)["contrast_max"].backward()
        assert torch.isfinite(flat.grad).all()
    assert flat.grad.abs().sum().item() > 0  # near flat, the term already pulls toward the sources' contrast


def test_target_gain_asks_for_a_gain_of_the_stronger_source_about_each_samples_mean() -> None:
    """At s 1.2 the max-intensity term is 0 for m + 1.2·(max − m) (m per sample, clamped to 0–255) and not for the max
    itself, and the gradient and local-contrast terms are less for it than for the max; at s 1 every term equals the
    sources' own targets bit for bit (the default adds nothing)."""
    gen = torch.Generator().manual_seed(8)
    ir, vis = (torch.rand(3, 1, 24, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    ir[1] *= 0.3  # a darker sample: a pivot over the whole batch would leave the term above 0
    w = torch.full_like(ir, 0.5)
    kwargs = dict(ir=ir, vis_y=vis, w_ir=w, w_vis=w, scale=255.0, intensity="l1", max_weight=1.0, grad_weight=1.0,
                  contrast_weight=1.0, contrast_window=5)
    brighter = torch.maximum(ir, vis)
    mean = brighter.mean(dim=(1, 2, 3), keepdim=True)
    gained = (mean + 1.2 * (brighter - mean)).clamp(0, 1)
    at_gain, at_max = (backbone_loss(f, target_gain=1.2, **kwargs) for f in (gained, brighter))
    assert at_gain["intensity_max"].item() == pytest.approx(0, abs=1e-9)
    assert at_max["intensity_max"].item() > 1
    for term in ("gradient_max", "contrast_max"):
        assert at_gain[term].item() < at_max[term].item()
    one, plain = backbone_loss(gained, target_gain=1.0, **kwargs), backbone_loss(gained, **kwargs)
    assert all(torch.equal(one[k], plain[k]) for k in plain)


def test_ssim_weight_scales_only_the_ssim_terms() -> None:
    """λ multiplies the two SSIM terms in the total; the reported terms stay unweighted."""
    gen = torch.Generator().manual_seed(2)
    f, ir, vis, w = (torch.rand(2, 1, 16, 16, generator=gen, dtype=torch.float64) for _ in range(4))
    one, ten = (backbone_loss(f, ir=ir, vis_y=vis, w_ir=w, w_vis=1 - w, scale=255.0, intensity="mse", ssim_weight=k)
                for k in (1.0, 10.0))
    for key in ("intensity_ir", "intensity_vis", "ssim_ir", "ssim_vis"):
        assert ten[key].item() == one[key].item()
    ssim = one["ssim_ir"].item() + one["ssim_vis"].item()
    assert ssim > 0.05
    assert (ten["backbone"] - one["backbone"]).item() == pytest.approx(9 * ssim, rel=1e-5)


def test_impaired_weight_scales_the_second_contrast() -> None:
    torch.manual_seed(1)
    net, cpn = Backbone(), CompensationPerceptionNetwork()
    out = net(vis_y=torch.rand(4, 1, 16, 16), ir=torch.rand(4, 1, 16, 16))
    main = cpn(ir=out.ir, vis=out.vis)
    imp = net(vis_y=torch.zeros(4, 1, 16, 16), ir=torch.rand(4, 1, 16, 16))
    imp_cpn = cpn(ir=imp.ir, vis=imp.vis)
    k1, k3 = (contrastive_loss(main, impaired_sso_ir=main.sso_ir, impaired_sso_vis=imp_cpn.sso_vis, alpha=0.25,
                               impaired_weight=k) for k in (1.0, 3.0))
    assert k1["contrast_2"].item() > 0
    assert (k3["cpn"] - k1["cpn"]).item() == pytest.approx(2 * k1["contrast_2"].item(), rel=1e-5)


def test_impair_cuts_regions(rng: np.random.Generator) -> None:
    img = np.full((50, 80), 200, dtype=np.uint8)
    out = impair(img, rng, ImpairParams(regions=2, min_frac=0.2, max_frac=0.3, fill=0.0))
    assert img.min() == 200  # input untouched
    cut = (out == 0).mean()
    assert 0.04 * 0.5 <= cut <= 2 * 0.09
    again = impair(img, np.random.default_rng(0), ImpairParams(regions=2, min_frac=0.2, max_frac=0.3))
    assert np.array_equal(out, again)
