"""CS2Fusion losses (paper §3.4): contrastive losses for the CPN and the compensation-weighted backbone loss.

Conventions, as in the release: similarities are cosine similarities of L2-normalised rows, an N×N matrix over
the batch clamped to [0.0005, 0.9995]; norms are Frobenius norms over the whole batch tensor on the 0–255
scale; SSIM is kornia's with a 3×3 window and ``max_val`` 1 on 0–255 data (so nearly unstabilised).
Under a :class:`~cs2fusion.span.BatchSpan` of several ranks every returned term is this rank's share of the global
batch's value (the rows of a similarity matrix that are its samples', against every rank's columns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from kornia.filters import box_blur, spatial_gradient
from kornia.losses import ssim_loss

from cs2fusion.model.cpn import CPNOutput
from cs2fusion.span import LOCAL, BatchSpan

SIM_MIN, SIM_MAX = 0.0005, 0.9995
STD_EPS = 1e-2  # added to a local variance (0–255 scale) before its root, so the root has a gradient on flat patches


def cosine_matrix(x: torch.Tensor, y: torch.Tensor, *, gram: bool = False) -> torch.Tensor:
    """(N, D), (M, D) → (N, M) cosine similarities, clamped to [0.0005, 0.9995].

    ``gram``: the Gram matrix divided by the row norms instead of normalised rows multiplied (equal up to
    round-off, ~3e-5 relative in the gradients): the division runs on the N×M matrix, not the N×D features,
    which saves two passes over them forward and four backward (the fast path; the default is the release's).
    """
    if gram:
        nx = torch.linalg.vector_norm(x, dim=1).clamp_min(1e-12)
        ny = torch.linalg.vector_norm(y, dim=1).clamp_min(1e-12)
        return ((x @ y.T) / (nx[:, None] * ny[None, :])).clamp(SIM_MIN, SIM_MAX)
    return (F.normalize(x, dim=1) @ F.normalize(y, dim=1).T).clamp(SIM_MIN, SIM_MAX)


def sim_max_loss(x: torch.Tensor, y: torch.Tensor, *, alpha: float, gram: bool = False,
                 span: BatchSpan = LOCAL) -> torch.Tensor:
    """Pulls rows together: mean(−log(sim) · exp(−alpha · rank)), rank = descending position in the row − 1.
    Under ``span``: this rank's rows of x against y, every rank's rows (:meth:`BatchSpan.gather`)."""
    sim = cosine_matrix(x, y, gram=gram)
    loss = (-torch.log(sim)).clamp(min=0)
    rank = sim.argsort(dim=1, descending=True, stable=True).argsort(dim=1) - 1
    return span.mean_share(loss * torch.exp(-alpha * rank.to(loss.dtype)))


def sim_min_loss(x: torch.Tensor, y: torch.Tensor, *, gram: bool = False, span: BatchSpan = LOCAL) -> torch.Tensor:
    """Pushes rows apart: mean(−log(1 − sim)) (rows and columns as in :func:`sim_max_loss`)."""
    return span.mean_share(-torch.log(1 - cosine_matrix(x, y, gram=gram)))


def contrastive_loss(
    main: CPNOutput, *, impaired_sso_ir: torch.Tensor, impaired_sso_vis: torch.Tensor, alpha: float,
    impaired_weight: float, gram: bool = False, span: BatchSpan = LOCAL,
) -> dict[str, torch.Tensor]:
    """loss_CPN = contrast_1 + k·contrast_2 (k = ``impaired_weight``), with its two terms, as a dict.

    contrast_1 = sim-max(SSO_ir, map_ir) + sim-max(SSO_vis, map_vis) + sim-min(map_vis, map_ir);
    contrast_2 = sim-max(map_ir, SSO_ir′) + sim-min(map_ir, SSO_vis′), ′ = the pass with the impaired visible
    (only SSO features of it are used, so the second pass needs no CPN forward). ``gram``: see :func:`cosine_matrix`.
    Under ``span`` the four column tensors are gathered once each.
    """
    map_ir, map_vis, imp_ir, imp_vis = map(span.gather, (main.map_ir, main.map_vis, impaired_sso_ir,
                                                          impaired_sso_vis))
    c1 = (
        sim_max_loss(main.sso_ir, map_ir, alpha=alpha, gram=gram, span=span)
        + sim_max_loss(main.sso_vis, map_vis, alpha=alpha, gram=gram, span=span)
        + sim_min_loss(main.map_vis, map_ir, gram=gram, span=span)
    )
    c2 = (sim_max_loss(main.map_ir, imp_ir, alpha=alpha, gram=gram, span=span)
          + sim_min_loss(main.map_ir, imp_vis, gram=gram, span=span))
    return {"cpn": c1 + impaired_weight * c2, "contrast_1": c1, "contrast_2": c2}


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """|∂x/∂u| + |∂x/∂v| with unnormalised 3×3 Sobel kernels and replicated borders, the field's texture measure."""
    return spatial_gradient(x, mode="sobel", normalized=False).abs().sum(dim=2)


def local_std(x: torch.Tensor, window: int) -> torch.Tensor:
    """Each pixel's standard deviation over the ``window``×``window`` box around it (reflected borders)."""
    mean = box_blur(x, (window, window), border_type="reflect")
    var = box_blur(x.square(), (window, window), border_type="reflect") - mean.square()
    return (var.clamp_min(0) + STD_EPS).sqrt()


def backbone_loss(
    fused: torch.Tensor,
    *,
    ir: torch.Tensor,
    vis_y: torch.Tensor,
    w_ir: torch.Tensor,
    w_vis: torch.Tensor,
    scale: float,
    intensity: str = "norm",
    ssim_weight: float = 1.0,
    max_weight: float = 0.0,
    grad_weight: float = 0.0,
    contrast_weight: float = 0.0,
    contrast_window: int = 9,
    target_gain: float = 1.0,
    span: BatchSpan = LOCAL,
) -> dict[str, torch.Tensor]:
    """‖F·w_ir − ir·w_ir‖ + ‖F·w_vis − vis·w_vis‖ + λ·(SSIMloss(F, ir) + SSIMloss(F, vis)), with its terms.

    fused, ir, vis_y: (N, 1, H, W) in [0, 1], compared on the 0–255 ``scale`` as the release does;
    w_ir, w_vis: compensation maps, used as constants (detached), so this loss never trains the CPN.
    ``intensity``: ``norm`` (the release's Frobenius norms over the batch: a sum of two unsquared distances, least
    at whichever source weighs more overall, so the fusion tends to a copy of it), ``mse`` (means of the squared
    weighted differences: least at the per-pixel mean (w_ir²·ir + w_vis²·vis) / (w_ir² + w_vis²)) or ``l1`` (means
    of the absolute weighted differences: unsquared like the release's but per pixel, so least at whichever source
    weighs more at that pixel, a selection by the map).
    ``ssim_weight`` λ: 1 in the release, where the SSIM terms (≤ 1) are lost beside intensity terms of 10²–10⁴; the
    reported ``ssim_*`` terms are unweighted.
    ``max_weight`` μ > 0 adds μ·d(F − max(ir, vis)) (same distance as ``intensity``, unweighted by the maps; not the
    paper's): the field's max-intensity prior, a pull toward the brighter source where the map is undecided.
    ``grad_weight`` γ > 0 adds γ·mean‖∇F| − max(|∇ir|, |∇vis|)| (:func:`sobel_magnitude`; not the paper's): the
    field's max-gradient texture term (SeAFusion, CDDFuse), which keeps the stronger edge of either source.
    ``contrast_weight`` κ > 0 adds κ·mean|σ(F) − max(σ(ir), σ(vis))| with σ the :func:`local_std` over
    ``contrast_window`` pixels (not the paper's): the larger-scale kin of γ's term, keeping the visible image's local
    contrast where the infrared is flat and the infrared's where the visible is.
    ``target_gain`` s ≠ 1 asks those three terms for s times the sources' contrast (not the paper's): the max-intensity
    target becomes m + s·(max(ir, vis) − m), m its mean over each sample, clamped to the 0–``scale`` range; the
    gradient and local-contrast targets s·max(·): what a global gain of the output would give, which buys SD, SF and
    AG at little fidelity as a transform (whether the nets learn it: docs/research/multi-sensor.md).
    """
    f, a, b = fused * scale, ir * scale, vis_y * scale
    w_ir, w_vis = w_ir.detach(), w_vis.detach()

    def distance(x: torch.Tensor) -> torch.Tensor:
        if intensity == "norm":
            return span.whole_share(span.norm(x))
        return span.mean_share(x.abs() if intensity == "l1" else x.square())

    def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return span.mean_share(ssim_loss(x, y, window_size=3, max_val=1.0, reduction="none"))

    def stronger_source(measure: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """mean|measure(F) − s·max(measure(ir), measure(vis))|: F keeps whichever source's texture is stronger."""
        return span.mean_share((measure(f) - target_gain * torch.maximum(measure(a), measure(b))).abs())

    def brighter_source() -> torch.Tensor:
        """max(ir, vis), or its gain s about each sample's mean."""
        target = torch.maximum(a, b)
        if target_gain == 1:
            return target
        mean = target.mean(dim=(1, 2, 3), keepdim=True)
        return (mean + target_gain * (target - mean)).clamp(0, scale)

    terms = {
        "intensity_ir": distance((f - a) * w_ir),
        "intensity_vis": distance((f - b) * w_vis),
        "ssim_ir": ssim(f, a),
        "ssim_vis": ssim(f, b),
    }
    total = terms["intensity_ir"] + terms["intensity_vis"] + ssim_weight * (terms["ssim_ir"] + terms["ssim_vis"])
    if max_weight > 0:
        terms["intensity_max"] = distance(f - brighter_source())
        total = total + max_weight * terms["intensity_max"]
    if grad_weight > 0:
        terms["gradient_max"] = stronger_source(sobel_magnitude)
        total = total + grad_weight * terms["gradient_max"]
    if contrast_weight > 0:
        terms["contrast_max"] = stronger_source(lambda x: local_std(x, contrast_window))
        total = total + contrast_weight * terms["contrast_max"]
    return {"backbone": total, **terms}
