"""``cs2fusion`` command line: fuse pairs, evaluate fused images, import the published weights, make demo data,
build kernels."""

from __future__ import annotations

import enum
import logging
import os
import sys
import time
from pathlib import Path
import typer
from tqdm import tqdm

from cs2fusion.io import InputError, check_writable_folder, os_error_line, refuse_aliasing
from cs2fusion.pretrained import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("cs2fusion")


def _fail(err: Exception) -> None:
    log.debug("details", exc_info=err)  # the traceback with -v
    typer.echo(f"error: {os_error_line(err) if isinstance(err, OSError) else err}", err=True)
    raise typer.Exit(2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _resolve_model(model: str) -> Path:
    """A checkpoint path, or a registry/run URI resolved through the MLflow adapter."""
    if model.startswith(("models:/", "runs:/")):
        from pipeline.mlflow_adapter import check_reachable, quick_http  # the thin MLflow adapter, only when asked
        from pipeline.registry import resolve_checkpoint

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri and not Path("mlflow.db").is_file():  # MLflow would create an empty store here
            raise InputError(f"{model}: no registry to ask; set MLFLOW_TRACKING_URI (or run where mlflow.db is)")
        check_reachable(uri)
        quick_http()
        try:
            return resolve_checkpoint(model)
        except Exception as err:  # MLflow raises many kinds; the user needs one line
            raise InputError(f"{model}: cannot load from the registry ({err})") from None
    return Path(model)


# Choices for typer: the same as cs2fusion.inference's DEVICES and PRECISIONS (a test checks), written out so that
# the command line does not import torch before it is needed.
Device = enum.Enum("Device", {d: d for d in ("auto", "cpu", "cuda")}, type=str)
Precision = enum.Enum("Precision", {p: p for p in ("fp32", "bf16")}, type=str)


@app.command()
def fuse(
    ir: Path = typer.Option(..., help="Infrared image, or a folder of them (<id>.png|jpg|bmp|tif)."),
    vi: Path = typer.Option(..., help="Visible image, or a folder of them with the same ids."),
    out: Path = typer.Option(..., help="Output .png (for one pair) or folder (writes <id>.png)."),
    model: str = typer.Option(
        str(DEFAULT_MODEL), help="Checkpoint (.safetensors) or registry URI models:/<name>@<alias>; default: the "
        "shipped model trained on RoadScene (cs2fusion/pretrained/MODEL_CARD.md)."
    ),
    device: Device = typer.Option(Device.auto, help="auto: a CUDA GPU where one is visible, else the CPU."),
    precision: Precision = typer.Option(Precision.fp32, help="bf16: about 2x faster on CPUs with AVX-512 BF16 or "
                                        "AMX, within 1 grey level of fp32 on >= 99 % of pixels."),
    tile: int = typer.Option(512, min=0, help="Tile side for images above --max-pixels (exact, 0: never tile)."),
    max_pixels: int = typer.Option(4_000_000, min=1, help="Images larger than this run in tiles (bounds memory)."),
    threads: int = typer.Option(0, min=0, help="CPU threads (0: torch's default, one per core)."),
) -> None:
    """Fuse one IR/visible pair or every pair of two folders matched by id; colour visible → colour output."""
    from cs2fusion.data.pairs import Pair, find_pairs, load_pair, unread_files
    from cs2fusion.inference.api import open_fuser
    from cs2fusion.io import IMAGE_SUFFIXES
    from cs2fusion.inference.fuser import FuseOptions
    from cs2fusion.io import write_png

    start = time.perf_counter()
    try:
        if ir.is_file() or vi.is_file():
            if not (ir.is_file() and vi.is_file()):
                raise InputError(f"{vi if ir.is_file() else ir}: give --ir and --vi both as files or both as folders")
            if out.suffix.lower() != ".png":
                raise InputError(f"{out}: the output of one pair is a .png file")
            if out.is_dir():
                raise InputError(f"{out}: is a folder; the output of one pair is a .png file")
            refuse_aliasing(out, ir, vi, may_hold_sources=True)
            check_writable_folder(out.parent)
            pairs, outputs = [Pair(vi.stem, ir, vi)], [out]
        else:
            pairs = find_pairs(ir, vi)
            for folder in (ir, vi):
                if skipped := unread_files(folder):
                    log.warning("%s: ignored %d file(s) not of an image type read (%s): %s", folder, len(skipped),
                                ", ".join(IMAGE_SUFFIXES), ", ".join(p.name for p in skipped))
            refuse_aliasing(out, ir, vi, may_hold_sources=True)
            check_writable_folder(out)
            outputs = [out / f"{pair.id}.png" for pair in pairs]
        for pair in tqdm(pairs, desc="checking", unit="pair", disable=None, leave=False):
            load_pair(pair)
        if threads:
            import torch

            torch.set_num_threads(threads)
        options = FuseOptions(precision=precision.value, tile=tile, max_pixels=max_pixels)
        fuser = open_fuser(_resolve_model(model), device=device.value, options=options)
        pixels, created = 0, []
        try:
            for pair, path in zip(tqdm(pairs, desc="fusing", unit="pair", disable=None, leave=False), outputs):
                ir_img, vi_img = load_pair(pair)
                new = not path.exists()
                write_png(path, fuser.fuse(vis=vi_img, ir=ir_img))
                if new:
                    created.append(path)
                pixels += ir_img.size
        except OSError:  # no space, a vanished folder: leave no partial run behind
            for path in created:
                path.unlink(missing_ok=True)
            raise
    except (InputError, OSError) as err:
        _fail(err)
    seconds = time.perf_counter() - start
    log.info("fused %d pair%s (%.2f Mpx) in %.1f s on %s, %s: %s", len(pairs), "s" * (len(pairs) != 1),
             pixels / 1e6, seconds, fuser.device, precision.value, out)


@app.command()
def evaluate(
    ir: Path = typer.Option(..., help="Folder of the infrared sources (<id>.png|jpg|bmp|tif)."),
    vi: Path = typer.Option(..., help="Folder of the visible sources with the same ids."),
    fused: list[str] = typer.Option(..., help="NAME=DIR of fused <id>.png|jpg|bmp|tif images (repeatable), or one "
                                    "DIR (named after the folder)."),
    out: Path | None = typer.Option(None, help="Write metrics.csv (per image), summary.json (means) and "
                                       "comparison.md here."),
    peers: list[Path] = typer.Option([], help="Folder of other methods' outputs, <method>/<id>.png|jpg|bmp|tif "
                                     "(repeatable): each method joins the table and the leaderboard."),
    grid: int = typer.Option(0, min=0, help="Also write grid.png: IR | visible | each method, first N pairs."),
    crops: int = typer.Option(0, min=0, help="Also write crops.png: the same centred crop of the first N pairs "
                              "across every method (columns in crops.txt)."),
    crop_size: int = typer.Option(128, min=16, help="Side of the crops (pixels)."),
    baselines: bool = typer.Option(True, help="Add the trivial fusions: pixel mean and pixel max (not ranked)."),
    workers: int = typer.Option(0, min=0, help="Processes computing the metrics (0: one per core); same numbers."),
) -> None:
    """Score fused images with the field's metrics, exactly as the reference evaluator (MMIF-CDDFuse's) does.

    With two methods or more, a leaderboard follows: each method's rank per main metric (1 = best; equal values
    share the best rank) and its mean rank (leaderboard.md, leaderboard.json).

    Conventions: every image to grey as Y = 0.299 R + 0.587 G + 0.114 B in float, rounded; EN, MI in nats (256
    levels, MI summed over both sources); SD, SF, AG on 0–255; SCD; VIF = pixel-domain VIF (4 scales, noise
    variance 2) summed over both sources; Qabf with Sobel and arctan; SSIM = sum of scikit-image SSIMs (7×7
    window, data range 2) against each source; CC, PSNR, MSE averaged over both sources. Higher is better for all
    but MSE. Means per method; best of each main metric in bold."""
    import numpy as np

    from cs2fusion.data.pairs import Pair, find_pairs, load_pair
    from cs2fusion.evaluation import (BASELINES, comparison_table, crop_box, evaluate_pairs, fused_image,
                                      fused_images, leaderboards, leaderboards_markdown, method_folders, summarize,
                                      write_leaderboards, write_tables)
    from cs2fusion.io import read_image, write_png, write_text
    from cs2fusion.visual import grid as make_grid

    try:
        methods = {}
        for spec in fused:
            name, sep, folder = spec.partition("=")
            path = Path(folder if sep else name)
            name = name if sep else path.resolve().name
            if not name.strip():
                raise InputError(f"--fused {spec}: empty method name (NAME=DIR)")
            if not path.is_dir():
                raise InputError(f"{path}: not a folder (--fused {spec})")
            if name in methods or (baselines and name in BASELINES):
                raise InputError(f"--fused {spec}: the method name {name!r} is taken")
            methods[name] = path
        for folder in peers:
            if not folder.is_dir():
                raise InputError(f"{folder}: not a folder (--peers)")
            for name, path in method_folders(folder).items():
                if name in methods or (baselines and name in BASELINES):
                    raise InputError(f"{path}: the method name {name!r} is taken (--peers {folder})")
                methods[name] = path
        pairs = find_pairs(ir, vi)
        set_name = ir.resolve().parent.name or "pairs"
        rows = evaluate_pairs(set_name, ((p.id, *load_pair(p)) for p in pairs), methods, baselines=baselines,
                              total=len(pairs), workers=workers)
        images = fused_images(methods) if grid or crops else {}

        def cells(pair: Pair, crop: int = 0) -> list[np.ndarray]:
            found = [*load_pair(pair), *(read_image(fused_image(images, m, f, set_name, pair.id))
                                         for m, f in methods.items())]
            return [c[crop_box(found[0].shape, crop)] for c in found] if crop else found

        pictures = {}
        if grid:
            pictures["grid.png"] = make_grid([cells(p) for p in pairs[:grid]])
        if crops:
            pictures["crops.png"] = make_grid([cells(p, crop_size) for p in pairs[:crops]], height=crop_size,
                                              labels=["IR", "visible", *methods])
        summary = summarize(rows)
        boards = leaderboards(summary)
        if out:
            refuse_aliasing(out, ir, vi, *methods.values(), *peers, may_hold_sources=True)
            out.mkdir(parents=True, exist_ok=True)
            write_tables(rows, out)
            write_leaderboards(summary, out)
            for file, picture in pictures.items():
                write_png(out / file, picture)
            if crops:
                write_text(out / "crops.txt", f"columns: IR | visible | {' | '.join(methods)}\n")
    except (InputError, OSError) as err:
        _fail(err)
    typer.echo(comparison_table(summary))
    if boards:
        typer.echo(leaderboards_markdown(boards, summary))
    if out:
        log.info("wrote the tables%s to %s", "".join(f", {f}" for f in pictures), out)


@app.command("import-published")
def import_published(
    folder: Path = typer.Argument(..., help="Folder with the release's backbone.pt and cpn.pt."),
    out: Path = typer.Option(..., help="Checkpoint to write (.safetensors)."),
    pretrain: bool = typer.Option(False, help="Take pretrain-backbone.pt instead of backbone.pt (no CPN)."),
) -> None:
    """Convert the paper's released state_dicts into a cs2fusion checkpoint with metadata."""
    from cs2fusion.checkpoint import save_checkpoint
    from cs2fusion.model import Backbone, CompensationPerceptionNetwork
    from cs2fusion.model.weights import WeightsError, load_published_backbone, load_published_cpn

    name = "pretrain-backbone.pt" if pretrain else "backbone.pt"
    backbone, cpn = Backbone(), None
    try:
        if not (folder / name).is_file():
            raise InputError(f"{folder / name}: no such file")
        load_published_backbone(backbone, folder / name)
        if not pretrain and (folder / "cpn.pt").is_file():
            cpn = CompensationPerceptionNetwork()
            load_published_cpn(cpn, folder / "cpn.pt")
    except (InputError, WeightsError) as err:
        _fail(err)
    save_checkpoint(out, backbone, cpn, source=f"CS2Fusion release ({name})", trained_by="Wang et al. 2024")
    log.info("wrote %s", out)


@app.command()
def synth(
    out: Path = typer.Option(Path("data/demo"), help="Folder to write ir/ and vi/ into."),
    pairs: int = typer.Option(16, min=1, help="Number of pairs."),
    width: int = typer.Option(160, min=16),
    height: int = typer.Option(128, min=16),
    seed: int = typer.Option(0),
) -> None:
    """Write the built-in demo data set (registered IR/visible pairs; a demo only, never for quality claims)."""
    from cs2fusion.config import SynthParams
    from cs2fusion.data.synth import write_demo

    write_demo(SynthParams(out=str(out), pairs=pairs, width=width, height=height, seed=seed))
    log.info("wrote %d demo pairs to %s", pairs, out)


@app.command("build-kernels")
def build_kernels() -> None:
    """Build the compiled inference kernel (the Winograd head) into the machine's cache now, so later processes
    (Ray workers, model servers) load it instead of compiling on first use. Exit 1 where it cannot be built."""
    from cs2fusion.inference import kernels

    if kernels.winograd_head() is None:
        typer.echo("error: the Winograd kernel could not be built (see above); fusion uses direct convolutions",
                   err=True)
        raise typer.Exit(1)
    log.info("Winograd kernel ready in %s", kernels.build_location())


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cs2fusion")


if __name__ == "__main__":
    sys.exit(main())
