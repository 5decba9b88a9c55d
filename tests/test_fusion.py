"""Inference paths on real pairs: fast == plain, exact tiling == whole image, batching, bf16 within ±1."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cs2fusion import kernels
from cs2fusion.checkpoint import load_checkpoint
from cs2fusion.color import rgb_to_grey, to_uint8
from cs2fusion.fusion import FuseOptions, Fuser, _denormals_flushed, pooled_max_sum
from cs2fusion.io import read_image
from cs2fusion.winograd import WinogradHead
from tests.conftest import DATA, RS40

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


def _pair(folder: Path, i: str) -> tuple[np.ndarray, np.ndarray]:
    vi = read_image(folder / "vi" / f"{i}.png")
    y = rgb_to_grey(vi) if vi.ndim == 3 else vi.astype(np.float32)
    return y, read_image(folder / "ir" / f"{i}.png").astype(np.float32)


@pytest.fixture(scope="module")
def backbone(published_ckpt: Path):
    return load_checkpoint(published_ckpt).backbone


@pytest.mark.parametrize("winograd", [pytest.param(True, marks=needs_compiler), False])
@pytest.mark.parametrize("folder, i, crop", [(RS40, "3", None), (DATA / "tno40", "7", None),
                                             (DATA / "tno40", "2", (301, 417))])  # odd sizes: partial 4×4 tiles
def test_fast_path_equals_plain(backbone, folder: Path, i: str, crop: tuple[int, int] | None, winograd: bool) -> None:
    y, ir = _pair(folder, i)
    if crop:
        y, ir = y[: crop[0], : crop[1]], ir[: crop[0], : crop[1]]
    plain = Fuser(backbone, options=FuseOptions(fast=False)).fuse_y(vis_y=y, ir=ir)
    fuser = Fuser(backbone, options=FuseOptions(winograd=winograd))
    assert (fuser.graph.head is not None) == winograd  # the kernel was built and used, or switched off
    assert np.abs(fuser.fuse_y(vis_y=y, ir=ir) - plain).max() <= 1e-3


@needs_compiler
@pytest.mark.parametrize("dtype, rel_tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("h, w, band_cols", [(37, 53, 3), (8, 4, 32), (1, 6, 1)])
def test_winograd_head_equals_fp64_convs(backbone, h: int, w: int, band_cols: int, dtype: torch.dtype,
                                         rel_tol: float) -> None:
    """The kernel against fp64 convs of the same features, odd sizes, bands of a few tiles (borders, band edges).

    Errors are relative to each output's range: fp32 Winograd measured ≤ 2.3e-6, bf16 products ≤ 3.3e-2 on these
    rough random features (real images' features are smoother; end to end see the bf16 test below)."""
    kernel = kernels.winograd_head()
    if dtype == torch.bfloat16 and not kernel.bf16_supported():
        pytest.skip("no bf16 products (brgemm) on this CPU")
    feats = (40 * torch.randn(2, 64, h, w, generator=torch.Generator().manual_seed(h)).abs()).to(dtype)
    head = WinogradHead(backbone, kernel, band_cols=band_cols, dtype=dtype)
    d1, *queries = (torch.full((1, c, h, w), np.nan, dtype=dtype).contiguous(memory_format=torch.channels_last)
                    for c in (64, *head.query_channels))
    with torch.inference_mode():
        head(feats.contiguous(memory_format=torch.channels_last), d1, queries)
    act = lambda t: F.leaky_relu(t, backbone.params.negative_slope)  # noqa: E731
    conv = lambda x, m: F.conv2d(x, m.weight.double(), m.bias.double(), padding=1)  # noqa: E731
    f = feats.double()
    with torch.no_grad():
        expected = [act(conv(f.reshape(1, -1, h, w), backbone.decoder[0]))]
        expected += [act(conv(f, d.query)).sum(0, keepdim=True) for d in backbone.ddm]
    for got, want in zip((d1, *queries), expected):
        assert (got.double() - want).abs().max() <= rel_tol * want.abs().max()


@pytest.mark.parametrize("c, h, w, rows, dtype", [(16, 37, 29, 64, torch.float32), (32, 8, 8, 16384, torch.bfloat16),
                                                   (64, 5, 3, 4, torch.float32)])
def test_pooled_max_sum_equals_direct_reduction(c: int, h: int, w: int, rows: int, dtype: torch.dtype) -> None:
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(c)).to(dtype)
    pooled_max, pooled_sum = pooled_max_sum(x.contiguous(memory_format=torch.channels_last), rows=rows)
    assert torch.equal(pooled_max, x.float().amax((2, 3)))
    assert torch.allclose(pooled_sum, x.float().sum((2, 3)), atol=1e-4)


def test_portable_conv_path_equals_plain(backbone) -> None:
    """The F.conv2d fallback (GPUs, builds without oneDNN's in-place conv) gives the same output."""
    y, ir = _pair(RS40, "8")
    plain = Fuser(backbone, options=FuseOptions(fast=False)).fuse_y(vis_y=y, ir=ir)
    fuser = Fuser(backbone)
    fuser.graph.onednn = False
    assert np.abs(fuser.fuse_y(vis_y=y, ir=ir) - plain).max() <= 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reused_buffers_do_not_leak_between_images(backbone, precision: str) -> None:
    """The fast path reuses one buffer across calls: a large image, then a smaller one, equals a fresh fuser."""
    (ya, ia), (yb, ib) = _pair(DATA / "tno40", "2"), _pair(RS40, "4")
    options = FuseOptions(precision=precision)
    fuser = Fuser(backbone, options=options)
    fuser.fuse_y(vis_y=ya, ir=ia)
    after = fuser.fuse_y(vis_y=yb, ir=ib)
    assert np.array_equal(after, Fuser(backbone, options=options).fuse_y(vis_y=yb, ir=ib))


def test_concurrent_callers_get_their_own_results(backbone) -> None:
    """One fuser shared by threads (a threaded model server): the reused buffer must not mix their images."""
    pairs = [_pair(RS40, i) for i in ("6", "7", "9", "10")]
    fuser = Fuser(backbone)
    alone = [fuser.fuse_y(vis_y=y, ir=ir) for y, ir in pairs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: fuser.fuse_y(vis_y=p[0], ir=p[1]), pairs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


@pytest.mark.parametrize("tile", [40, 96])
def test_tiled_equals_whole(backbone, tile: int) -> None:
    y, ir = _pair(DATA / "tno40", "2")  # 632×496, not a multiple of the tile
    y, ir = y[:301, :417], ir[:301, :417]  # odd sizes
    whole = Fuser(backbone).fuse_y(vis_y=y, ir=ir)
    tiled = Fuser(backbone, options=FuseOptions(tile=tile, max_pixels=0)).fuse_y(vis_y=y, ir=ir)
    assert whole.shape == tiled.shape == y.shape
    assert np.abs(tiled - whole).max() <= 1e-3


def test_batch_equals_singles(backbone) -> None:
    a, b = _pair(RS40, "1"), _pair(RS40, "2")
    h, w = min(a[0].shape[0], b[0].shape[0]), min(a[0].shape[1], b[0].shape[1])
    crop = lambda p: (p[0][:h, :w], p[1][:h, :w])  # noqa: E731
    (ya, ia), (yb, ib) = crop(a), crop(b)
    fuser = Fuser(backbone)
    batch = fuser.fuse_y_batch([ya, yb], [ia, ib])
    assert np.abs(batch[0] - fuser.fuse_y(vis_y=ya, ir=ia)).max() <= 1e-3
    assert np.abs(batch[1] - fuser.fuse_y(vis_y=yb, ir=ib)).max() <= 1e-3


@pytest.mark.parametrize("winograd", [pytest.param(True, marks=needs_compiler), False])
@pytest.mark.parametrize("folder, i", [(RS40, "5"), (RS40, "20"), (DATA / "tno40", "11")])
def test_bf16_within_one_grey_level(backbone, folder: Path, i: str, winograd: bool) -> None:
    y, ir = _pair(folder, i)
    ref = to_uint8(Fuser(backbone).fuse_y(vis_y=y, ir=ir)).astype(int)
    fuser = Fuser(backbone, options=FuseOptions(precision="bf16", winograd=winograd))
    if winograd and kernels.winograd_head().bf16_supported():
        assert fuser.graph.head is not None  # the bf16 Winograd head is the one tested
    else:
        assert fuser.graph.head is None
    low = to_uint8(fuser.fuse_y(vis_y=y, ir=ir)).astype(int)
    assert (np.abs(low - ref) <= 1).mean() >= 0.99


@pytest.mark.parametrize("flushed_before", [False, True])
def test_denormal_setting_is_restored(backbone, flushed_before: bool) -> None:
    """The fast path flushes denormals while it runs (a ten-fold slowdown otherwise) and leaves the caller's
    setting as it found it."""
    y, ir = _pair(RS40, "16")
    torch.set_flush_denormal(flushed_before)
    try:
        Fuser(backbone).fuse_y(vis_y=y[:64, :64], ir=ir[:64, :64])
        assert _denormals_flushed() == flushed_before
    finally:
        torch.set_flush_denormal(False)
