"""Stage ``evaluate``: the field's metrics per image and method, a summary for DVC, a comparison table, plots
and a visual report (IR | visible | ours | published), also logged to the training run in MLflow."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cs2fusion.checkpoint import read_meta
from cs2fusion.data.shards import iter_eval, read_index, set_files, set_prefix
from cs2fusion.evaluation import (BASELINES, comparison_table, crop_box, evaluate_set, fused_image,
                                  fused_images, method_folders, wins, write_leaderboards, write_tables)
from cs2fusion.io import InputError, atomic_dir, read_image, write_png, write_text
from cs2fusion.metrics import ALL_METRICS, MAIN_METRICS, METRICS_VERSION
from cs2fusion.visual import grid
from pipeline.common import clean_errors, location, parser, setup

log = logging.getLogger("pipeline.evaluate")


def _bar_chart(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), len(MAIN_METRICS), figsize=(2.2 * len(MAIN_METRICS), 2.6 * len(summary)),
                             squeeze=False)
    for row, (name, methods) in zip(axes, summary.items()):
        for ax, metric in zip(row, MAIN_METRICS):
            ax.bar(list(methods), [v[metric] for v in methods.values()], color="#4c72b0")
            ax.set_title(f"{name}\n{metric}", fontsize=8)
            ax.tick_params(axis="x", labelrotation=60, labelsize=7)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _samples(name: str, files: list[str], fused: dict[str, Path], count: int, crop: int = 0) -> list[list]:
    """The first ``count`` pairs of set ``name`` as rows IR | visible | each method's fused image (the centred
    ``crop`` of each)."""
    rows, images = [], fused_images(fused)
    for k, (meta, ir, vi) in enumerate(iter_eval(files)):
        if k >= count:
            break
        row = [ir, vi, *(read_image(fused_image(images, m, f, name, meta["id"])) for m, f in fused.items())]
        rows.append([image[crop_box(ir.shape, crop)] for image in row] if crop else row)
    return rows


def _peers(peers: dict[str, str], sets: list[str], ours: list[str]) -> dict[str, dict[str, Path]]:
    """evaluate.peers resolved: set → {method: its folder}; an unknown set, a missing folder or a method name that
    is taken raises before anything is written."""
    out = {}
    for name, folder in peers.items():
        if name not in sets:
            raise InputError(f"evaluate.peers: {name!r} is not among the shards' evaluation sets {sets}")
        path = Path(folder)
        if not path.is_dir():
            raise InputError(f"{path}: not a folder (evaluate.peers.{name})")
        methods = method_folders(path)
        taken = sorted(set(methods) & {*ours, *BASELINES})
        if taken:
            raise InputError(f"{path}: method names {taken} are taken by the fuse stage or the baselines")
        out[name] = methods
    return out


def _log_to_mlflow(params, model: Path, summary: dict, boards: dict, report: Path) -> None:
    run_id = read_meta(model).get("mlflow_run_id")
    if not run_id:
        log.warning("%s has no MLflow run id: evaluation not logged to MLflow", model)
        return
    from pipeline.mlflow_adapter import artifact_location, model_run, tracking_uri

    tracker = model_run(tracking_uri(params.tracking, Path.cwd()), run_id, params.train.tracking.experiment,
                        artifact_location(params.tracking, Path.cwd()), "evaluate")
    values = {}
    for name, methods in summary.items():
        for method, metrics in methods.items():
            prefix = f"eval/{name}" if method == "ours" else f"eval/{name}/{method}"
            values.update({f"{prefix}/{m}": metrics[m] for m in ALL_METRICS})
    for name, rows in boards.items():
        for place, row in enumerate(rows, 1):
            if row["method"] == "ours":
                values.update({f"leaderboard/{name}/mean_rank": row["mean_rank"], f"leaderboard/{name}/place": place})
    tracker.metrics(values, step=0)
    for path in sorted(report.iterdir()):
        tracker.artifact(path, "evaluation")


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--fused", type=Path, required=True, help="output of the fuse stage")
    p.add_argument("--shards", type=location, required=True, help="shard folder or s3:// prefix (the sources)")
    p.add_argument("--model", type=Path, required=True, help="the evaluated checkpoint (for its MLflow run)")
    p.add_argument("--metrics", type=Path, required=True, help="summary metrics file (JSON, DVC metrics)")
    p.add_argument("--report", type=Path, required=True, help="report folder (CSV, table, plots, samples)")
    args = p.parse_args()
    params = setup(args)
    sets = [n for n, s in read_index(args.shards)["sets"].items() if s["kind"] == "eval"]
    if not sets:
        raise InputError(f"{args.shards}: no evaluation sets")
    primary = params.evaluate.primary_set or sets[0]
    if primary not in sets:  # checked before the report folder is touched
        raise InputError(f"evaluate.primary_set {primary!r} is not among the shards' evaluation sets {sets}")
    if not args.fused.is_dir():
        raise InputError(f"{args.fused}: not a folder (run the fuse stage)")
    methods = sorted(d.name for d in args.fused.iterdir() if d.is_dir())
    peers = _peers(params.evaluate.peers, sets, methods)
    rows = []
    with atomic_dir(args.report, "evaluate", inputs=(args.fused, args.shards)) as tmp:
        for name in sets:
            fused = {**{m: args.fused / m / set_prefix(name) for m in methods}, **peers.get(name, {})}
            rows += evaluate_set(name, set_files(args.shards, name), fused)
            ours = {m: fused[m] for m in methods}
            samples = _samples(name, set_files(args.shards, name), ours, params.evaluate.report_samples)
            write_png(tmp / f"samples_{set_prefix(name)}.png", grid(samples))
            (tmp / f"samples_{set_prefix(name)}.txt").write_text("columns: IR | visible | " + " | ".join(methods))
            if params.evaluate.crops:
                crops = _samples(name, set_files(args.shards, name), fused, params.evaluate.crops,
                                 crop=params.evaluate.crop_size)
                write_png(tmp / f"crops_{set_prefix(name)}.png", grid(crops, height=params.evaluate.crop_size,
                                                                     labels=["IR", "visible", *fused]))
                (tmp / f"crops_{set_prefix(name)}.txt").write_text("columns: IR | visible | " + " | ".join(fused))
        summary = write_tables(rows, tmp)
        boards = write_leaderboards(summary, tmp)
        _bar_chart(summary, tmp / "comparison.png")
    result = {"primary_set": primary, "metrics_version": METRICS_VERSION, "sets": summary,
              "leaderboards": {n: {r["method"]: {"mean_rank": r["mean_rank"], "place": place}
                                   for place, r in enumerate(board, 1)} for n, board in boards.items()}}
    if "published" in summary[primary]:
        result["ours_beats_published_on"] = {n: wins(m["ours"], m["published"]) for n, m in summary.items()}
    write_text(args.metrics, json.dumps(result, indent=2, sort_keys=True) + "\n")
    _log_to_mlflow(params, args.model, summary, boards, args.report)
    log.info("\n%s", comparison_table(summary, MAIN_METRICS))


if __name__ == "__main__":
    main()
