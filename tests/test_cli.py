"""``cs2fusion fuse`` on good and bad input: one clear line naming the file, non-zero exit, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cs2fusion.cli import app
from cs2fusion.io import read_image
from tests.conftest import DATA, RS40


def _copy_pairs(dst: Path, ids: list[str], src: Path = RS40) -> tuple[Path, Path]:
    for kind in ("ir", "vi"):
        (dst / kind).mkdir(parents=True)
        for i in ids:
            shutil.copy(src / kind / f"{i}.png", dst / kind / f"{i}.png")
    return dst / "ir", dst / "vi"


def _fuse(model: Path, ir: Path, vi: Path, out: Path):
    return CliRunner().invoke(app, ["fuse", "--model", str(model), "--ir", str(ir), "--vi", str(vi), "--out", str(out)])


@pytest.mark.data
def test_grey_in_grey_out(published_ckpt: Path, tmp_path: Path) -> None:
    ir, vi = _copy_pairs(tmp_path, ["5"], src=DATA / "tno40")
    result = _fuse(published_ckpt, ir, vi, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = read_image(tmp_path / "out" / "5.png")
    assert out.ndim == 2 and out.shape == read_image(ir / "5.png").shape
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["5.png"]  # no temp files left


def _missing_partner(ir: Path, vi: Path) -> str:
    (vi / "2.png").unlink()
    return str(ir / "2.png")


def _size_mismatch(ir: Path, vi: Path) -> str:
    Image.open(vi / "2.png").crop((0, 0, 100, 100)).save(vi / "2.png")
    return str(vi / "2.png")


def _corrupt(ir: Path, vi: Path) -> str:
    (ir / "2.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return str(ir / "2.png")


def _truncated(ir: Path, vi: Path) -> str:
    data = (vi / "2.png").read_bytes()
    (vi / "2.png").write_bytes(data[: len(data) // 2])
    return str(vi / "2.png")


def _rgba(ir: Path, vi: Path) -> str:
    Image.open(vi / "2.png").convert("RGBA").save(vi / "2.png")
    return str(vi / "2.png")


def _sixteen_bit(ir: Path, vi: Path) -> str:
    arr = np.asarray(Image.open(ir / "2.png")).astype(np.uint16) * 257
    Image.fromarray(arr).save(ir / "2.png")
    assert Image.open(ir / "2.png").mode.startswith("I")
    return str(ir / "2.png")


def _empty(ir: Path, vi: Path) -> str:
    for p in ir.iterdir():
        p.unlink()
    return str(ir)


BAD: dict[str, Callable[[Path, Path], str]] = {
    "missing partner": _missing_partner,
    "size mismatch": _size_mismatch,
    "corrupt": _corrupt,
    "truncated": _truncated,
    "rgba": _rgba,
    "16-bit": _sixteen_bit,
    "empty folder": _empty,
}


@pytest.mark.data
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(case: str, published_ckpt: Path, tmp_path: Path) -> None:
    ir, vi = _copy_pairs(tmp_path, ["1", "2", "3"])
    named = BAD[case](ir, vi)
    out = tmp_path / "out"
    result = _fuse(published_ckpt, ir, vi, out)
    assert result.exit_code != 0
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert named in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.data
def test_missing_model_is_one_line(tmp_path: Path) -> None:
    ir, vi = _copy_pairs(tmp_path, ["1"])
    result = _fuse(tmp_path / "nope.safetensors", ir, vi, tmp_path / "out")
    assert result.exit_code != 0
    assert "nope.safetensors" in result.output


def test_default_model_is_shipped_with_a_card(tmp_path: Path) -> None:
    from cs2fusion.checkpoint import read_meta
    from cs2fusion.pretrained import DEFAULT_MODEL, MODEL_CARD

    meta = read_meta(DEFAULT_MODEL)
    assert meta["source"].startswith("cs2fusion") and meta["mlflow_run_id"] and not meta["has_cpn"]
    assert DEFAULT_MODEL.stat().st_size < 1_500_000 and "RoadScene" in MODEL_CARD.read_text()
    demo = tmp_path / "demo"
    assert CliRunner().invoke(app, ["synth", "--out", str(demo), "--pairs", "2"]).exit_code == 0
    result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for vi in (demo / "vi").iterdir():
        assert read_image(tmp_path / "out" / vi.name).shape == read_image(vi).shape
