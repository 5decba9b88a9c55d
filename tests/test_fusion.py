"""Inference: the fast graph equals the model's own forward (both heads), the kernel against fp64 convs, tiling,
batching, buffer reuse, threads, bf16, and where the compiled kernel applies."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cs2fusion.color import luminance, to_uint8
from cs2fusion.config import ModelParams
from cs2fusion.inference import FuseOptions, Fuser, kernels
from cs2fusion.inference.buffers import denormals_flushed, pooled_max_sum
from cs2fusion.inference.heads import DirectHead, WinogradHead
from cs2fusion.io import read_image
from cs2fusion.model import Backbone
from tests.conftest import DATA, REPO, RS40, synth_pairs


def _pair(folder: Path, i: str) -> tuple[np.ndarray, np.ndarray]:
    vi = read_image(folder / "vi" / f"{i}.png")
    y = luminance(vi)
    return y, read_image(folder / "ir" / f"{i}.png").astype(np.float32)


def _fast(backbone: Backbone, request: pytest.FixtureRequest, winograd: bool, **options) -> Fuser:
    """A fast-path fuser whose head is the one asked for (the kernel fixture skips where it cannot be built)."""
    if winograd:
        request.getfixturevalue("winograd_kernel")
    fuser = Fuser(backbone, options=FuseOptions(winograd=winograd, **options))
    assert isinstance(fuser.graph.head, WinogradHead if winograd else DirectHead)
    return fuser


def _plain(backbone: Backbone, y: np.ndarray, ir: np.ndarray) -> np.ndarray:
    return Fuser(backbone, options=FuseOptions(fast=False)).fuse_y(vis_y=y, ir=ir)


@pytest.fixture(scope="module")
def published(published_ckpt: Path) -> Backbone:
    from cs2fusion.checkpoint import load_checkpoint

    return load_checkpoint(published_ckpt).backbone


@pytest.mark.parametrize("winograd", [True, False])
@pytest.mark.parametrize("h, w", [(128, 160), (101, 157)])  # odd sizes: partial 4×4 tiles
def test_fast_path_equals_plain(shipped_backbone, request, h: int, w: int, winograd: bool) -> None:
    (y, ir), = synth_pairs(1, h, w, seed=h)
    fast = _fast(shipped_backbone, request, winograd).fuse_y(vis_y=y, ir=ir)
    assert np.abs(fast - _plain(shipped_backbone, y, ir)).max() <= 1e-3


@pytest.mark.data
@pytest.mark.parametrize("winograd", [True, False])
@pytest.mark.parametrize("folder, i, crop", [(RS40, "3", None), (DATA / "tno40", "7", None),
                                             (DATA / "tno40", "2", (301, 417))])
def test_fast_path_equals_plain_on_real_pairs(published, request, folder: Path, i: str,
                                              crop: tuple[int, int] | None, winograd: bool) -> None:
    y, ir = _pair(folder, i)
    if crop:
        y, ir = y[: crop[0], : crop[1]], ir[: crop[0], : crop[1]]
    fast = _fast(published, request, winograd).fuse_y(vis_y=y, ir=ir)
    assert np.abs(fast - _plain(published, y, ir)).max() <= 1e-3


@pytest.mark.parametrize("dtype, rel_tol", [(torch.float32, 1e-5), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("h, w, band_cols", [(37, 53, 3), (8, 4, 32), (1, 6, 1)])
def test_winograd_head_equals_fp64_convs(shipped_backbone, winograd_kernel, h: int, w: int, band_cols: int,
                                         dtype: torch.dtype, rel_tol: float) -> None:
    """The kernel against fp64 convs of the same features, odd sizes, bands of a few tiles (borders, band edges).

    Errors are relative to each output's range: fp32 Winograd measured ≤ 2.3e-6, bf16 products ≤ 3.3e-2 on these
    rough random features (real images' features are smoother; end to end see the bf16 test below)."""
    if dtype == torch.bfloat16 and not winograd_kernel.bf16_supported():
        pytest.skip("no bf16 products (brgemm) on this CPU")
    backbone = shipped_backbone
    feats = (40 * torch.randn(2, 64, h, w, generator=torch.Generator().manual_seed(h)).abs()).to(dtype)
    head = WinogradHead(backbone, winograd_kernel, band_cols=band_cols, dtype=dtype)
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


@pytest.mark.parametrize("channels", [8, 24])
def test_other_widths_use_the_direct_head(channels: int) -> None:
    """The kernel is built for 16 channels (64 features per branch): any other width gets the direct head, even
    where the kernel exists, and still equals the model's own forward."""
    torch.manual_seed(channels)
    backbone = Backbone(ModelParams(channels=channels)).eval()
    (y, ir), = synth_pairs(1, 45, 61)
    fuser = Fuser(backbone, options=FuseOptions(winograd=True))
    assert isinstance(fuser.graph.head, DirectHead)
    plain = _plain(backbone, y, ir)
    assert np.abs(fuser.fuse_y(vis_y=y, ir=ir) - plain).max() <= 1e-5 * max(1.0, np.abs(plain).max())
    kernel = kernels.winograd_head()
    if kernel is not None:
        with pytest.raises(ValueError, match="feature channels"):
            WinogradHead(backbone, kernel)


def test_kernel_override_and_missing_tools(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """``CS2FUSION_NO_KERNELS=1`` switches the kernel off; a machine without a compiler gets None and one warning,
    not an exception (the loader is called uncached here)."""
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    assert kernels.winograd_head.__wrapped__() is None
    monkeypatch.delenv(kernels.DISABLE_ENV)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name in ("c++", "ninja") else real_which(name))
    monkeypatch.setitem(sys.modules, "ninja", None)  # the pip package is not there either
    with caplog.at_level(logging.WARNING):
        assert kernels.winograd_head.__wrapped__() is None
    assert "no C++ compiler" in caplog.text


def test_kernel_is_not_rebuilt_by_a_process_with_another_ninja(winograd_kernel) -> None:
    """Every process builds with the pip package's ninja, whatever PATH it has: a system ninja first on PATH used to
    hash the build command differently and rebuild the shared build (about a minute) on every switch."""
    log = kernels.build_location() / ".ninja_log"
    before = log.read_text()
    system_path = "/usr/local/bin:/usr/bin:/bin"
    for path in (system_path, f"{Path(sys.executable).parent}:{system_path}"):
        proc = subprocess.run([sys.executable, "-c", "from cs2fusion.inference import kernels; "
                               "assert kernels.winograd_head() is not None"], env={**os.environ, "PATH": path},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert log.read_text() == before


def test_kernel_cache_is_keyed_by_source_and_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(kernels.CACHE_ENV, str(tmp_path))
    name, folder = kernels._build_key()
    assert folder.is_relative_to(tmp_path) and torch.__version__.replace("+", "_") in str(folder)
    source = tmp_path / "winograd_head.cpp"
    source.write_text(kernels.SOURCE.read_text() + "\n// edited\n")
    monkeypatch.setattr(kernels, "SOURCE", source)
    other_name, other_folder = kernels._build_key()
    assert other_name != name and other_folder != folder


def test_two_environments_get_kernel_builds_of_their_own(tmp_path: Path) -> None:
    """A second venv with its own torch (here: this torch's files at another path, as a second checkout's venv has)
    puts its build command's include folders elsewhere: it gets another build folder, so ninja never rebuilds the
    first environment's build (which used to flip back and forth, about a minute each time); the same environment
    gets the same folder in every process."""
    import sysconfig

    venv = tmp_path / "venv2"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "torch").symlink_to(Path(torch.__file__).parent)
    (site,) = (venv / "lib").glob("python*/site-packages")
    (site / "deps.pth").write_text(f"{shim}\n{sysconfig.get_paths()['purelib']}\n")
    probe = ("from cs2fusion.inference import kernels; from torch.utils import cpp_extension; "
             "print(kernels.build_location()); print(cpp_extension.include_paths()[0])")

    def where(python: Path) -> list[str]:
        proc = subprocess.run([str(python), "-c", probe], env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.split()

    here, again, there = where(Path(sys.executable)), where(Path(sys.executable)), where(venv / "bin" / "python")
    assert there[1].startswith(str(shim)) and not here[1].startswith(str(shim))  # another torch install path
    assert here == again and there[0] != here[0] and Path(there[0]).parent == Path(here[0]).parent


def test_only_tested_precisions() -> None:
    for bad in ("fp16", "int8"):
        with pytest.raises(ValueError, match="precision"):
            FuseOptions(precision=bad)
    with pytest.raises(ValueError, match="fp32 only"):
        FuseOptions(precision="bf16", fast=False)


@pytest.mark.parametrize("c, h, w, rows, dtype", [(16, 37, 29, 64, torch.float32), (32, 8, 8, 16384, torch.bfloat16),
                                                   (64, 5, 3, 4, torch.float32)])
def test_pooled_max_sum_equals_direct_reduction(c: int, h: int, w: int, rows: int, dtype: torch.dtype) -> None:
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(c)).to(dtype)
    pooled_max, pooled_sum = pooled_max_sum(x.contiguous(memory_format=torch.channels_last), rows=rows)
    assert torch.equal(pooled_max, x.float().amax((2, 3)))
    assert torch.allclose(pooled_sum, x.float().sum((2, 3)), atol=1e-4)


def test_portable_conv_path_equals_plain(shipped_backbone) -> None:
    """The F.conv2d fallback (GPUs, builds without oneDNN's in-place conv), in the encoders and the direct head."""
    (y, ir), = synth_pairs(1, 96, 128, seed=8)
    fuser = Fuser(shipped_backbone, options=FuseOptions(winograd=False))
    assert isinstance(fuser.graph.head, DirectHead) and fuser.graph.head.conv is fuser.graph.conv
    fuser.graph.conv.onednn = False
    assert np.abs(fuser.fuse_y(vis_y=y, ir=ir) - _plain(shipped_backbone, y, ir)).max() <= 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reused_buffers_do_not_leak_between_images(shipped_backbone, precision: str) -> None:
    """The fast path reuses one buffer across calls: a large image, then a smaller one, equals a fresh fuser."""
    (ya, ia), = synth_pairs(1, 160, 200, seed=1)
    (yb, ib), = synth_pairs(1, 96, 112, seed=2)
    options = FuseOptions(precision=precision)
    fuser = Fuser(shipped_backbone, options=options)
    fuser.fuse_y(vis_y=ya, ir=ia)
    after = fuser.fuse_y(vis_y=yb, ir=ib)
    assert np.array_equal(after, Fuser(shipped_backbone, options=options).fuse_y(vis_y=yb, ir=ib))


def test_concurrent_callers_get_their_own_results(shipped_backbone) -> None:
    """One fuser shared by threads (a threaded model server): the reused buffer must not mix their images."""
    pairs = synth_pairs(4, 80, 96, seed=3)
    fuser = Fuser(shipped_backbone)
    alone = [fuser.fuse_y(vis_y=y, ir=ir) for y, ir in pairs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: fuser.fuse_y(vis_y=p[0], ir=p[1]), pairs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, together))


@pytest.mark.parametrize("tile", [40, 96])
def test_tiled_equals_whole(shipped_backbone, tile: int) -> None:
    (y, ir), = synth_pairs(1, 201, 217, seed=4)  # odd sizes, not a multiple of the tile
    whole = Fuser(shipped_backbone).fuse_y(vis_y=y, ir=ir)
    tiled = Fuser(shipped_backbone, options=FuseOptions(tile=tile, max_pixels=0)).fuse_y(vis_y=y, ir=ir)
    assert whole.shape == tiled.shape == y.shape
    assert np.abs(tiled - whole).max() <= 1e-3


def test_batch_equals_singles(shipped_backbone) -> None:
    (ya, ia), (yb, ib) = synth_pairs(2, 72, 88, seed=5)
    fuser = Fuser(shipped_backbone)
    batch = fuser.fuse_y_batch([ya, yb], [ia, ib])
    assert np.abs(batch[0] - fuser.fuse_y(vis_y=ya, ir=ia)).max() <= 1e-3
    assert np.abs(batch[1] - fuser.fuse_y(vis_y=yb, ir=ib)).max() <= 1e-3


@pytest.mark.data
@pytest.mark.parametrize("winograd", [True, False])
@pytest.mark.parametrize("folder, i", [(RS40, "5"), (RS40, "20"), (DATA / "tno40", "11")])
def test_bf16_within_one_grey_level(published, request, folder: Path, i: str, winograd: bool) -> None:
    y, ir = _pair(folder, i)
    ref = to_uint8(Fuser(published).fuse_y(vis_y=y, ir=ir)).astype(int)
    if winograd:
        kernel = request.getfixturevalue("winograd_kernel")
        if not kernel.bf16_supported():
            pytest.skip("no bf16 products (brgemm) on this CPU")
    fuser = _fast(published, request, winograd, precision="bf16")
    low = to_uint8(fuser.fuse_y(vis_y=y, ir=ir)).astype(int)
    assert (np.abs(low - ref) <= 1).mean() >= 0.99


@pytest.mark.parametrize("flushed_before", [False, True])
def test_denormal_setting_is_restored(shipped_backbone, flushed_before: bool) -> None:
    """The fast path flushes denormals while it runs (a ten-fold slowdown otherwise) and leaves the caller's
    setting as it found it."""
    (y, ir), = synth_pairs(1, 64, 64, seed=6)
    torch.set_flush_denormal(flushed_before)
    try:
        Fuser(shipped_backbone).fuse_y(vis_y=y, ir=ir)
        assert denormals_flushed() == flushed_before
    finally:
        torch.set_flush_denormal(False)
