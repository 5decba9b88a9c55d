"""Training progress on the driver: rank 0 posts its latest step to a tiny Ray actor, the driver draws one live
bar from it (epoch, step/steps, loss, samples/s, ETA) and logs one line per finished epoch."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from tqdm import tqdm

log = logging.getLogger("pipeline.train")


class Board:
    """The latest progress record (a Ray actor with no CPU: it never takes a training worker's slot)."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}

    def post(self, record: dict[str, Any]) -> None:
        self.latest = record

    def read(self) -> dict[str, Any]:
        return self.latest


class Reporter:
    """Worker side: turns step callbacks into progress records (rank 0 only; a no-op without a board)."""

    def __init__(self, board: Any, *, epochs: int, batch_size: int) -> None:
        self.board, self.epochs, self.batch_size = board, epochs, batch_size
        self.epoch, self.steps, self.first_step, self.started = 0, 0, 0, time.perf_counter()
        self.record: dict[str, Any] = {}
        self.finished: dict[str, Any] = {}  # the last finished epoch, carried in every record so none is missed

    def start_epoch(self, epoch: int, steps: int, global_step: int) -> None:
        self.epoch, self.steps, self.first_step, self.started = epoch, steps, global_step, time.perf_counter()

    def step(self, global_step: int, loss: float) -> None:
        if self.board is None:
            return
        done = global_step - self.first_step
        rate = done * self.batch_size / max(time.perf_counter() - self.started, 1e-9)
        self.record = {"epoch": self.epoch, "epochs": self.epochs, "step": done, "steps": self.steps,
                       "global_step": global_step, "loss": loss, "samples_per_s": rate,
                       "total": global_step - done + self.steps * (self.epochs - self.epoch)}
        self.board.post.remote({**self.record, **self.finished})

    def end_epoch(self, means: dict[str, float]) -> None:
        if self.board is None:
            return
        self.finished = {"epoch_done": self.epoch + 1, "epoch_loss": means.get("loss/backbone", float("nan")),
                         "epoch_samples_per_s": means.get("perf/samples_per_s", float("nan"))}
        self.board.post.remote({**self.record, **self.finished})


class Follower:
    """Driver side: a thread that polls the board and draws the bar until stopped."""

    def __init__(self, board: Any, *, interval_s: float = 0.5) -> None:
        self.board, self.interval_s = board, interval_s
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="train-progress", daemon=True)

    def __enter__(self) -> Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        import ray

        bar, logged = None, 0
        try:
            stopped = False
            while not stopped:  # one last read after the stop: the final epoch's line is never lost
                stopped = self.stop_event.wait(self.interval_s)
                try:
                    rec = ray.get(self.board.read.remote(), timeout=30)
                except Exception:  # the actor is gone with the cluster: the trainer reports the real error
                    return
                if not rec:
                    continue
                if bar is None:
                    bar = tqdm(total=rec["total"], desc="training", unit="step", disable=None, dynamic_ncols=True)
                bar.total = rec["total"]
                bar.update(rec["global_step"] - bar.n)
                bar.set_postfix_str(f"epoch {rec['epoch'] + 1}/{rec['epochs']}, step {rec['step']}/{rec['steps']}, "
                                    f"loss {rec['loss']:.4g}, {rec['samples_per_s']:.1f} samples/s", refresh=False)
                if rec.get("epoch_done", 0) > logged:
                    logged = rec["epoch_done"]
                    line = (f"epoch {logged}/{rec['epochs']}: loss/backbone {rec['epoch_loss']:.4g}, "
                            f"{rec['epoch_samples_per_s']:.1f} samples/s")
                    if bar.disable:
                        log.info(line)
                    else:
                        bar.write(line)
        finally:
            if bar is not None:
                bar.close()
