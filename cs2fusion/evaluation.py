"""Evaluation of fused images: per-image metrics per method, trivial baselines, summaries and comparisons.

Every image is converted to grey as the reference evaluator does (:func:`grey_like_reference`). The trivial
baselines are the golden file's: ``mean`` = floor((ir + vi)/2 + 0.5) and ``max`` = max(ir, vi), on grey.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import io
import itertools
import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from cs2fusion.data.pairs import list_images
from cs2fusion.data.shards import iter_eval
from cs2fusion.io import IMAGE_SUFFIXES, InputError, read_image, write_text
from cs2fusion.metrics import ALL_METRICS, MAIN_METRICS, all_metrics, grey_like_reference

log = logging.getLogger(__name__)
BASELINES = {
    "mean": lambda ir, vi: np.floor((ir + vi) / 2 + 0.5),
    "max": lambda ir, vi: np.maximum(ir, vi),
}


def fused_images(fused: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """method → (id → its fused image): ``<folder>/<id>.<png|jpg|bmp|tif…>``, as methods publish them (the paper's
    own outputs are .bmp, most repositories' .jpg); an id twice in one folder raises."""
    return {method: list_images(folder) for method, folder in fused.items()}


def fused_image(images: dict[str, dict[str, Path]], method: str, folder: Path, name: str, pair_id: str) -> Path:
    """The fused image of ``pair_id`` by ``method``, or InputError naming what is missing."""
    path = images[method].get(pair_id)
    if path is None:
        raise InputError(f"{folder / pair_id}.png: missing fused image for {name}/{pair_id} ({method}; no "
                         f"{', '.join(IMAGE_SUFFIXES[1:])} of that id either)")
    return path


def _pair_rows(name: str, pair_id: str, ir_img: np.ndarray, vi_img: np.ndarray, paths: dict[str, Path],
               baselines: bool) -> list[dict[str, Any]]:
    """One pair's rows: each method's fused image (``paths``) and the trivial baselines (pure: runs in a worker)."""
    ir, vi = grey_like_reference(ir_img), grey_like_reference(vi_img)
    rows = []
    for method, path in paths.items():
        f = grey_like_reference(read_image(path))
        if f.shape != ir.shape:
            raise InputError(f"{path}: size {f.shape[1]}x{f.shape[0]} does not match the sources "
                             f"({ir.shape[1]}x{ir.shape[0]})")
        rows.append({"set": name, "method": method, "id": pair_id, **all_metrics(f, ir, vi)})
    for method, fn in (BASELINES.items() if baselines else ()):
        rows.append({"set": name, "method": method, "id": pair_id, **all_metrics(fn(ir, vi), ir, vi)})
    return rows


def evaluate_pairs(name: str, pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], fused: dict[str, Path],
                   *, baselines: bool = True, total: int | None = None, workers: int = 0) -> list[dict[str, Any]]:
    """Rows (set, method, id, metrics…) for (id, ir, vi) source pairs: every method's fused image of each id
    (:func:`fused_images`), plus the trivial baselines, in the pairs' order. A missing fused image or one of another
    size raises, naming the file. The pairs are scored by ``workers`` processes (0: one per core; 1: this one), at
    most two pairs per worker in flight; the numbers do not depend on it."""
    images = fused_images(fused)
    workers = min(workers or os.cpu_count() or 1, total or 1 << 30)
    log.info("evaluating %s: %s pairs × %d methods%s on %d process(es)", name, total if total is not None else "the",
             len(fused), " + 2 baselines" if baselines else "", workers)
    bar = tqdm(desc=f"evaluating {name}", unit="pair", total=total, disable=None)
    rows: list[dict[str, Any]] = []

    def tasks() -> Iterator[tuple]:
        for pair_id, ir_img, vi_img in pairs:
            paths = {m: fused_image(images, m, folder, name, pair_id) for m, folder in fused.items()}
            yield name, pair_id, ir_img, vi_img, paths, baselines

    with bar:
        if workers == 1:
            for task in tasks():
                rows += _pair_rows(*task)
                bar.update()
            return rows
        # spawned, not forked: the caller may hold threads (MLflow's sender, torch's pools) that a fork would copy
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending: collections.deque = collections.deque()
            for task in itertools.chain(tasks(), [None]):
                if task is not None:
                    pending.append(pool.submit(_pair_rows, *task))
                while pending and (task is None or len(pending) >= 2 * workers):
                    rows += pending.popleft().result()
                    bar.update()
    return rows


def _shard_pairs(files: list[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for meta, ir, vi in iter_eval(files):
        yield meta["id"], ir, vi


def evaluate_set(name: str, files: list[str], fused: dict[str, Path]) -> list[dict[str, Any]]:
    """:func:`evaluate_pairs` over the sources of one evaluation set's shards."""
    return evaluate_pairs(name, _shard_pairs(files), fused)


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{set: {method: {metric: mean over images, "n": count}}}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["set"], row["method"]), []).append(row)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, method), items in sorted(groups.items()):
        means = {m: float(np.mean([r[m] for r in items])) for m in ALL_METRICS}
        out.setdefault(name, {})[method] = {**means, "n": len(items)}
    return out


def wins(challenger: dict[str, float], reference: dict[str, float], metrics: Iterable[str] = MAIN_METRICS) -> list[str]:
    """The metrics (higher is better) on which ``challenger`` beats ``reference``."""
    return [m for m in metrics if challenger[m] > reference[m]]


def comparison_table(summary: dict[str, dict[str, dict[str, float]]], metrics: Iterable[str] = ALL_METRICS) -> str:
    """A Markdown table per set: methods × metrics (means), best of each main metric in bold."""
    metrics = list(metrics)
    lines = []
    for name, methods in summary.items():
        n = next(iter(methods.values()))["n"]
        lines += [f"**{name}** ({n} pairs)", "", "| method | " + " | ".join(metrics) + " |",
                  "|---" * (len(metrics) + 1) + "|"]
        best = {m: max(v[m] for v in methods.values()) for m in metrics if m in MAIN_METRICS}
        for method, values in methods.items():
            cells = [f"**{values[m]:.4g}**" if best.get(m) == values[m] else f"{values[m]:.4g}" for m in metrics]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def rows_csv(rows: list[dict[str, Any]]) -> str:
    """Per-image rows as CSV (set, method, id, every metric)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["set", "method", "id", *ALL_METRICS])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_tables(rows: list[dict[str, Any]], folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``metrics.csv`` (per image), ``summary.json`` (means) and ``comparison.md`` into ``folder``; the summary."""
    summary = summarize(rows)
    write_text(folder / "metrics.csv", rows_csv(rows))
    write_text(folder / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    write_text(folder / "comparison.md", comparison_table(summary))
    return summary


def leaderboard(methods: dict[str, dict[str, float]], metrics: Iterable[str] = MAIN_METRICS) -> list[dict[str, Any]]:
    """Each method's mean per metric, its rank per metric (1 = best, higher is better; equal values share the best
    of their ranks: 1, 2, 2, 4) and its mean rank over ``metrics``; best mean rank first (equal ones by name)."""
    from scipy.stats import rankdata

    metrics, names = list(metrics), list(methods)
    ranks = {m: rankdata([-methods[n][m] for n in names], method="min") for m in metrics}
    rows = [{"method": n, **{m: float(methods[n][m]) for m in metrics},
             **{f"rank/{m}": int(ranks[m][i]) for m in metrics},
             "mean_rank": float(np.mean([ranks[m][i] for m in metrics]))} for i, n in enumerate(names)]
    return sorted(rows, key=lambda r: (r["mean_rank"], r["method"]))


def leaderboard_table(rows: list[dict[str, Any]], metrics: Iterable[str] = MAIN_METRICS) -> str:
    """:func:`leaderboard` rows as Markdown: each cell the mean and its rank, 1st places in bold, mean rank last."""
    metrics = list(metrics)
    lines = ["| # | method | " + " | ".join(metrics) + " | mean rank |", "|---" * (len(metrics) + 3) + "|"]
    for place, row in enumerate(rows, 1):
        cells = [f"{row[m]:.4g} ({row[f'rank/{m}']})" for m in metrics]
        cells = [f"**{c}**" if row[f"rank/{m}"] == 1 else c for c, m in zip(cells, metrics)]
        lines.append(f"| {place} | {row['method']} | " + " | ".join(cells) + f" | {row['mean_rank']:.2f} |")
    return "\n".join(lines) + "\n"


def crop_box(shape: tuple[int, ...], size: int) -> tuple[slice, slice]:
    """The centred ``size`` × ``size`` window of an image of ``shape`` (smaller where the image is)."""
    h, w = shape[:2]
    ch, cw = min(size, h), min(size, w)
    top, left = (h - ch) // 2, (w - cw) // 2
    return slice(top, top + ch), slice(left, left + cw)


def method_folders(folder: Path) -> dict[str, Path]:
    """A folder of other methods' outputs (``<method>/<id>.png``…) → {method: its folder}, by name."""
    return {d.name: d for d in sorted(folder.iterdir()) if d.is_dir()}


def leaderboards(summary: dict[str, dict[str, dict[str, float]]]) -> dict[str, list[dict[str, Any]]]:
    """:func:`leaderboard` of each set with at least two methods; the trivial baselines are not ranked."""
    boards = {}
    for name, methods in summary.items():
        ranked = {m: v for m, v in methods.items() if m not in BASELINES}
        if len(ranked) >= 2:
            boards[name] = leaderboard(ranked)
    return boards


def leaderboards_markdown(boards: dict[str, list[dict[str, Any]]], summary: dict[str, dict[str, dict[str, float]]]
                          ) -> str:
    """Each set's leaderboard as Markdown under a heading naming the set and its pair count."""
    parts = []
    for name, rows in boards.items():
        n = next(iter(summary[name].values()))["n"]
        parts += [f"**{name}** ({n} pairs, {len(rows)} methods; rank per metric in brackets, mean rank over the "
                  f"{len(MAIN_METRICS)} main metrics)", "", leaderboard_table(rows)]
    return "\n".join(parts)


def write_leaderboards(summary: dict[str, dict[str, dict[str, float]]], folder: Path
                       ) -> dict[str, list[dict[str, Any]]]:
    """``leaderboard.md`` and ``leaderboard.json`` into ``folder`` when a set has one; the leaderboards."""
    boards = leaderboards(summary)
    if boards:
        write_text(folder / "leaderboard.md", leaderboards_markdown(boards, summary))
        write_text(folder / "leaderboard.json", json.dumps(boards, indent=2) + "\n")
    return boards
