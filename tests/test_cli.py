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


def _synth(tmp_path: Path, pairs: int = 2) -> Path:
    demo = tmp_path / "demo"
    assert CliRunner().invoke(app, ["synth", "--out", str(demo), "--pairs", str(pairs), "--width", "64",
                                    "--height", "48"]).exit_code == 0
    return demo


def test_fuse_one_pair_and_bf16_match_the_library(tmp_path: Path) -> None:
    from cs2fusion.inference import FuseOptions, Fuser
    from cs2fusion.checkpoint import load_checkpoint
    from cs2fusion.pretrained import DEFAULT_MODEL

    demo = _synth(tmp_path)
    ir, vi = demo / "ir" / "demo001.png", demo / "vi" / "demo001.png"
    backbone = load_checkpoint(DEFAULT_MODEL).backbone
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.png"
        result = CliRunner().invoke(app, ["fuse", "--ir", str(ir), "--vi", str(vi), "--out", str(out), "--device",
                                          "cpu", "--precision", precision, "--threads", "1"])
        assert result.exit_code == 0, result.output
        expected = Fuser(backbone, options=FuseOptions(precision=precision)).fuse(vis=read_image(vi), ir=read_image(ir))
        assert np.array_equal(read_image(out), expected), precision
        assert [p.name for p in tmp_path.glob(f"*{precision}*")] == [f"{precision}.png"]  # no temp files left


@pytest.mark.parametrize("args, named", [
    (["--precision", "fp8"], "fp8"),
    (["--device", "tpu"], "tpu"),
    (["--tile", "-1"], "--tile"),
])
def test_fuse_refuses_bad_option_values(args: list[str], named: str, tmp_path: Path) -> None:
    demo = _synth(tmp_path)
    result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                      str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and named in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
def test_fuse_on_cuda_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    demo = _synth(tmp_path)
    result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                      str(tmp_path / "out"), "--device", "cuda"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        line for line in result.output.strip().splitlines() if line.startswith("error:")], result.output
    assert "cuda" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("into", ["vi", "ir", "vi/sub"])
def test_fuse_never_writes_over_its_sources(into: str, tmp_path: Path) -> None:
    demo = _synth(tmp_path)
    before = {p: p.read_bytes() for p in demo.rglob("*.png")}
    result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                      str(demo / into)])
    assert result.exit_code == 2 and "overwrite" in result.output, result.output
    assert {p: p.read_bytes() for p in demo.rglob("*.png")} == before


def test_fuse_pair_api(tmp_path: Path) -> None:
    import cs2fusion
    from cs2fusion.io import InputError

    demo = _synth(tmp_path)
    ir, vi = demo / "ir" / "demo002.png", demo / "vi" / "demo002.png"
    out = tmp_path / "cli.png"
    assert CliRunner().invoke(app, ["fuse", "--ir", str(ir), "--vi", str(vi), "--out", str(out)]).exit_code == 0
    assert np.array_equal(cs2fusion.fuse_pair(read_image(ir), read_image(vi)), read_image(out))
    assert np.array_equal(cs2fusion.fuse_pair(ir, vi), read_image(out))
    with pytest.raises(InputError, match="uint8"):
        cs2fusion.fuse_pair(read_image(ir).astype(np.float32), read_image(vi))


@pytest.mark.data
def test_evaluate_reproduces_the_reference_evaluator(tmp_path: Path) -> None:
    """The paper's own outputs and the trivial fusions on the 40 RoadScene pairs: the golden means to 1e-3."""
    import json

    from tests.conftest import GOLDEN

    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["evaluate", "--ir", str(RS40 / "ir"), "--vi", str(RS40 / "vi"), "--fused",
                                      f"published={RS40 / 'fused_published'}", "--out", str(out), "--grid", "2"])
    assert result.exit_code == 0, result.output
    assert "| published |" in result.output and "| max |" in result.output
    summary = json.loads((out / "summary.json").read_text())["cs2fusion_roadscene40"]
    golden = json.loads((GOLDEN / "cs2fusion_roadscene40.json").read_text())["methods"]
    for method in ("published", "mean", "max"):
        assert summary[method]["n"] == 40
        for metric, gold in golden[method]["mean"].items():
            assert summary[method][metric] == pytest.approx(gold, rel=1e-3), (method, metric)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 40 and rows[0].startswith("set,method,id,EN")
    assert read_image(out / "grid.png").ndim == 3 and (out / "comparison.md").is_file()


def test_evaluate_names_a_missing_or_mismatched_fused_image(tmp_path: Path) -> None:
    demo = _synth(tmp_path, pairs=3)
    fused = tmp_path / "fused"
    assert CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                    str(fused)]).exit_code == 0
    ok = CliRunner().invoke(app, ["evaluate", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--fused",
                                  str(fused), "--no-baselines"])
    assert ok.exit_code == 0 and "| fused |" in ok.output and "| max |" not in ok.output, ok.output
    (fused / "demo003.png").unlink()
    for named in ("demo003.png", "demo002.png"):
        result = CliRunner().invoke(app, ["evaluate", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"),
                                          "--fused", f"ours={fused}", "--out", str(tmp_path / "rep")])
        assert result.exit_code == 2 and named in result.output, result.output
        assert not (tmp_path / "rep").exists()
        shutil.copy(demo / "ir" / "demo003.png", fused / "demo003.png")  # the next round: only a size mismatch
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(fused / "demo002.png")


def test_cli_choices_are_the_library_s() -> None:
    from cs2fusion import cli
    from cs2fusion.inference import DEVICES, PRECISIONS

    assert [d.value for d in cli.Device] == list(DEVICES) and [p.value for p in cli.Precision] == list(PRECISIONS)


def test_evaluate_reads_fused_images_as_methods_publish_them(tmp_path: Path) -> None:
    """Folders of .bmp (the paper's own outputs) and .jpg (most repositories') are read as .png folders are, matched
    by id: the lossless .bmp scores exactly as the .png (before: "missing fused image"). An empty method name is
    refused in one line."""
    import json

    demo = _synth(tmp_path, pairs=3)
    folders = {kind: tmp_path / kind for kind in ("png", "bmp", "jpg")}
    assert CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                    str(folders["png"])]).exit_code == 0
    for kind in ("bmp", "jpg"):
        folders[kind].mkdir()
        for png in folders["png"].glob("*.png"):
            Image.open(png).save(folders[kind] / f"{png.stem}.{kind}", quality=95)
    specs = [f"{kind}={folder}" for kind, folder in folders.items()]
    result = CliRunner().invoke(app, ["evaluate", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"),
                                      *sum((["--fused", s] for s in specs), []), "--out", str(tmp_path / "rep"),
                                      "--grid", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    (means,) = summary.values()
    assert means["bmp"] == means["png"] and means["jpg"]["n"] == 3
    assert means["jpg"]["EN"] == pytest.approx(means["png"]["EN"], rel=0.02)
    empty = CliRunner().invoke(app, ["evaluate", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--fused",
                                     f"={folders['png']}"])
    assert empty.exit_code == 2 and "empty method name" in empty.output, empty.output


def test_fuse_names_the_files_it_does_not_read(tmp_path: Path) -> None:
    """A visible image as .gif beside a .png infrared one: the missing partner's message names the .gif as a type
    not read (before: only "no visible partner")."""
    demo = _synth(tmp_path, pairs=2)
    gif = demo / "vi" / "demo002.gif"
    Image.open(demo / "vi" / "demo002.png").save(gif)
    (demo / "vi" / "demo002.png").unlink()
    result = CliRunner().invoke(app, ["fuse", "--ir", str(demo / "ir"), "--vi", str(demo / "vi"), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{gif} is not an image type read" in result.output, result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.data
def test_evaluate_ranks_peers_in_a_leaderboard_with_crops(tmp_path: Path) -> None:
    """``--peers`` (a folder of ``<method>/<id>.png``) puts each method in the table and the leaderboard (ranks and
    mean rank; the baselines not ranked), with the same crop across every method; a peer named like a method given
    with ``--fused`` is refused in one line."""
    import json

    ids = ("1", "2", "3")
    for kind in ("ir", "vi", "fused_published"):
        (tmp_path / kind).mkdir()
        for i in ids:
            shutil.copy(RS40 / kind / f"{i}.png", tmp_path / kind / f"{i}.png")
    out = tmp_path / "report"
    args = ["evaluate", "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"), "--fused",
            f"published={tmp_path / 'fused_published'}", "--peers", str(DATA / "peers" / "roadscene40")]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--crops", "2", "--crop-size", "64", "--workers", "1"])
    assert result.exit_code == 0, result.output
    board = json.loads((out / "leaderboard.json").read_text())[tmp_path.name]
    assert [row["method"] for row in board] == sorted((r["method"] for r in board),
                                                      key=lambda m: next(r["mean_rank"] for r in board
                                                                         if r["method"] == m))
    assert {row["method"] for row in board} == {"published", "AUIF", "DIDFuse"}
    summary = json.loads((out / "summary.json").read_text())[tmp_path.name]
    for row in board:  # each rank is the place of the method's mean among the three
        for metric in ("EN", "VIF", "SSIM"):
            better = sum(summary[m][metric] > row[metric] for m in ("published", "AUIF", "DIDFuse"))
            assert row[f"rank/{metric}"] == better + 1
    assert "mean rank" in result.output
    assert (out / "leaderboard.md").read_text().count("\n| ") == 1 + 3  # the header and 3 methods
    crops = read_image(out / "crops.png")
    assert crops.shape[0] == 14 + 4 + 2 * 64 + 4 and "published | AUIF | DIDFuse" in (out / "crops.txt").read_text()
    clash = tmp_path / "clash" / "published"
    shutil.copytree(tmp_path / "fused_published", clash)
    taken = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "clash")])
    assert taken.exit_code != 0 and "the method name 'published' is taken" in taken.output
