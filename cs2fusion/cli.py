"""``cs2fusion`` command line: fuse folders of pairs, import the published weights, make demo data, build kernels."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
import typer
from tqdm import tqdm

from cs2fusion.io import InputError
from cs2fusion.pretrained import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
log = logging.getLogger("cs2fusion")


def _fail(err: Exception) -> None:
    typer.echo(f"error: {err}", err=True)
    raise typer.Exit(2)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _resolve_model(model: str) -> Path:
    """A checkpoint path, or a registry/run URI resolved through the MLflow adapter."""
    if model.startswith(("models:/", "runs:/")):
        from pipeline.registry import resolve_checkpoint  # the thin MLflow adapter, only when asked for

        try:
            return resolve_checkpoint(model)
        except Exception as err:  # MLflow raises many kinds; the user needs one line
            raise InputError(f"{model}: cannot load from the registry ({err})") from None
    return Path(model)


@app.command()
def fuse(
    model: str = typer.Option(
        str(DEFAULT_MODEL), help="Checkpoint (.safetensors) or registry URI models:/<name>@<alias>; default: the "
        "shipped model trained on RoadScene (cs2fusion/pretrained/MODEL_CARD.md)."
    ),
    ir: Path = typer.Option(..., help="Folder of infrared images (<id>.png|jpg|bmp|tif)."),
    vi: Path = typer.Option(..., help="Folder of visible images with the same ids."),
    out: Path = typer.Option(..., help="Output folder; writes <id>.png."),
) -> None:
    """Fuse every IR/visible pair matched by id; colour visible → colour output, grey → grey."""
    from cs2fusion.checkpoint import load_checkpoint
    from cs2fusion.data.pairs import find_pairs, load_pair
    from cs2fusion.inference import Fuser
    from cs2fusion.io import write_png

    try:
        pairs = find_pairs(ir, vi)
        for pair in tqdm(pairs, desc="checking", unit="pair", disable=None):
            load_pair(pair)
        fuser = Fuser(load_checkpoint(_resolve_model(model)).backbone)
        for pair in tqdm(pairs, desc="fusing", unit="pair", disable=None):
            ir_img, vi_img = load_pair(pair)
            write_png(out / f"{pair.id}.png", fuser.fuse(vis=vi_img, ir=ir_img))
    except InputError as err:
        _fail(err)
    log.info("fused %d pairs into %s", len(pairs), out)


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
