"""The standard IVIF metrics, defined as the field's reference evaluator computes them (MMIF-CDDFuse's).

Conventions (every function):
- inputs are grey images on the 0–255 scale, (H, W), uint8 or float with integer values (colour images are
  converted before, with :func:`grey_like_reference`: Y = 0.299 R + 0.587 G + 0.114 B in float, rounded);
- ``fused`` first, then the two sources, infrared then visible; all the same shape;
- computed in float64; bad input raises ``ValueError``;
- MI is in nats (natural log) on the 256 integer levels, summed over both sources;
- SSIM is the sum of two scikit-image SSIMs (7×7 uniform window) with data range 2, as the reference gets
  implicitly for float input: nearly unstabilised, range 0–2;
- VIF is pixel-domain VIF (4 scales, noise variance 2) summed over both sources (not Han et al.'s VIFF);
- Qabf is Xydeas–Petrović with Sobel gradients and angle arctan(Sy/Sx) (not atan2), including the
  reference's treatment of equal gradient strengths.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from cs2fusion.color import rgb_to_grey
from cs2fusion.config import MAIN_METRICS
# Names the conventions below; recorded with every evaluation, so that the promotion gate compares like with like.
METRICS_VERSION = "mmif-cddfuse-1"
ALL_METRICS = (*MAIN_METRICS, "CC", "PSNR", "MSE")


def grey_like_reference(image: np.ndarray) -> np.ndarray:
    """uint8 grey or RGB image → float64 grey with integer values (half-to-even rounding, as the reference)."""
    image = np.asarray(image)
    if image.ndim == 3:
        return np.round(rgb_to_grey(image)).astype(np.float64)
    return image.astype(np.float64)


def _check(*images: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(x, dtype=np.float64) for x in images]
    for x in out:
        if x.ndim != 2:
            raise ValueError(f"metrics take grey (H, W) images, got shape {x.shape}")
        if x.shape != out[0].shape:
            raise ValueError(f"image shapes differ: {x.shape} vs {out[0].shape}")
        if x.size < 4 or min(x.shape) < 2:
            raise ValueError(f"image too small for the metrics: {x.shape}")
    return out


def _levels(x: np.ndarray) -> np.ndarray:
    levels = np.round(x)
    if levels.min() < 0 or levels.max() > 255:
        raise ValueError("grey levels must lie in 0..255")
    return levels.astype(np.int64)


def entropy(fused: np.ndarray) -> float:
    """EN: Shannon entropy (bits) of the 256-bin histogram."""
    (f,) = _check(fused)
    p = np.bincount(_levels(f).ravel(), minlength=256) / f.size
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def std_dev(fused: np.ndarray) -> float:
    """SD: population standard deviation."""
    (f,) = _check(fused)
    return float(f.std())


def spatial_frequency(fused: np.ndarray) -> float:
    """SF: sqrt(mean(dx²) + mean(dy²)) with forward differences, no padding."""
    (f,) = _check(fused)
    return float(math.sqrt(np.mean(np.diff(f, axis=1) ** 2) + np.mean(np.diff(f, axis=0) ** 2)))


def average_gradient(fused: np.ndarray) -> float:
    """AG: mean(sqrt((Gx² + Gy²) / 2)), central differences, one-sided at the borders."""
    (f,) = _check(fused)
    gy, gx = np.gradient(f)
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2)))


def _mi(a: np.ndarray, b: np.ndarray) -> float:
    joint = np.bincount((_levels(a) * 256 + _levels(b)).ravel(), minlength=256 * 256).reshape(256, 256)
    p = joint / joint.sum()
    pa, pb = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    return float((p[nz] * (np.log(p[nz]) - np.log(np.outer(pa, pb)[nz]))).sum())


def mutual_information(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """MI: MI(F, ir) + MI(F, vi) in nats over the 256 integer levels."""
    f, a, b = _check(fused, ir, vi)
    return _mi(f, a) + _mi(f, b)


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / math.sqrt((xc**2).sum() * (yc**2).sum()))


def scd(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """SCD: corr(ir, F − vi) + corr(vi, F − ir)."""
    f, a, b = _check(fused, ir, vi)
    return _corr(a, f - b) + _corr(b, f - a)


def cc(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """CC: (corr(ir, F) + corr(vi, F)) / 2."""
    f, a, b = _check(fused, ir, vi)
    return (_corr(a, f) + _corr(b, f)) / 2


def mse(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """MSE: mean of the two sources' mean squared errors to F."""
    f, a, b = _check(fused, ir, vi)
    return float((np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2)


def psnr(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """PSNR: 10 log10(max(F)² / MSE); −inf for an all-black F, +inf where F equals both sources (as numpy gives)."""
    f = _check(fused)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(10 * np.log10(np.float64(f.max()) ** 2 / np.float64(mse(fused, ir, vi))))


def _gauss_1d(n: int) -> np.ndarray:
    sd = n / 5.0
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-(x * x) / (2 * sd * sd))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """2-D 'valid' filtering with the separable kernel outer(g, g)."""
    y = ndimage.correlate1d(x, g, axis=0, mode="constant")
    y = ndimage.correlate1d(y, g, axis=1, mode="constant")
    r = len(g) // 2
    return y[r : x.shape[0] - r, r : x.shape[1] - r]


def _vif_pixel(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float = 2.0, eps: float = 1e-10) -> float:
    num = den = 0.0
    for scale in range(1, 5):
        g = _gauss_1d(2 ** (4 - scale + 1) + 1)
        if scale > 1:
            ref = _filter_valid(ref, g)[::2, ::2]
            dist = _filter_valid(dist, g)[::2, ::2]
        mu1, mu2 = _filter_valid(ref, g), _filter_valid(dist, g)
        s1 = np.maximum(_filter_valid(ref * ref, g) - mu1 * mu1, 0)
        s2 = np.maximum(_filter_valid(dist * dist, g) - mu2 * mu2, 0)
        s12 = _filter_valid(ref * dist, g) - mu1 * mu2
        gain = s12 / (s1 + eps)
        sv = s2 - gain * s12
        low1 = s1 < eps
        gain[low1], sv[low1], s1[low1] = 0, s2[low1], 0
        low2 = s2 < eps
        gain[low2], sv[low2] = 0, 0
        neg = gain < 0
        sv[neg], gain[neg] = s2[neg], 0
        sv[sv <= eps] = eps
        num += np.log10(1 + gain * gain * s1 / (sv + sigma_nsq)).sum()
        den += np.log10(1 + s1 / sigma_nsq).sum()
    value = num / den
    return 1.0 if np.isnan(value) else float(value)


def vif_pixel(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """VIF (pixel domain, Sheikh–Bovik vifp): vifp(ir → F) + vifp(vi → F)."""
    f, a, b = _check(fused, ir, vi)
    return _vif_pixel(a, f) + _vif_pixel(b, f)


_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
_SOBEL_Y = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)


def _edges(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sx = ndimage.convolve(x, _SOBEL_X, mode="constant")
    sy = ndimage.convolve(x, _SOBEL_Y, mode="constant")
    strength = np.sqrt(sx * sx + sy * sy)
    angle = np.full_like(x, math.pi / 2)
    nz = sx != 0
    angle[nz] = np.arctan(sy[nz] / sx[nz])
    return strength, angle


def _q_edge(ga: np.ndarray, aa: np.ndarray, gf: np.ndarray, af: np.ndarray) -> np.ndarray:
    g = np.where(ga > gf, gf / np.where(ga > gf, ga, 1), np.where(ga < gf, ga / np.where(ga < gf, gf, 1), gf))
    a = 1 - np.abs(aa - af) / (math.pi / 2)
    qg = 0.9994 / (1 + np.exp(-15 * (g - 0.5)))
    qa = 0.9879 / (1 + np.exp(-22 * (a - 0.8)))
    return qg * qa


def qabf(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """Qabf (Xydeas–Petrović edge preservation), Sobel, L = 1, arctan(Sy/Sx) angles."""
    f, a, b = _check(fused, ir, vi)
    (ga, aa), (gb, ab), (gf, af) = _edges(a), _edges(b), _edges(f)
    num = (_q_edge(ga, aa, gf, af) * ga + _q_edge(gb, ab, gf, af) * gb).sum()
    return float(num / (ga + gb).sum())


def ssim_reference_sum(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> float:
    """SSIM(F, ir) + SSIM(F, vi): scikit-image, 7×7 uniform window, data range 2 (the reference's implicit one)."""
    f, a, b = _check(fused, ir, vi)
    return float(structural_similarity(f, a, data_range=2.0) + structural_similarity(f, b, data_range=2.0))


def all_metrics(fused: np.ndarray, ir: np.ndarray, vi: np.ndarray) -> dict[str, float]:
    """Every metric of :data:`ALL_METRICS` for one fused image and its sources (grey, 0–255)."""
    f, a, b = _check(fused, ir, vi)
    return {
        "EN": entropy(f),
        "SD": std_dev(f),
        "SF": spatial_frequency(f),
        "AG": average_gradient(f),
        "MI": mutual_information(f, a, b),
        "SCD": scd(f, a, b),
        "VIF": vif_pixel(f, a, b),
        "Qabf": qabf(f, a, b),
        "SSIM": ssim_reference_sum(f, a, b),
        "CC": cc(f, a, b),
        "PSNR": psnr(f, a, b),
        "MSE": mse(f, a, b),
    }
