"""One trainer per run: a lease beside the run's folder (a local file or an object), held while a training runs.

The holder renews it every third of its time to live; a second trainer of the same run fails in one line naming the
holder. A lease whose holder stopped renewing (its process was killed) expires and is taken over; on the holder's own
host a dead process's lease is taken over at once. Object stores have no atomic create, so a starter writes its
lease, waits a moment and reads it back: of two starters racing, the one whose lease was overwritten fails.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cs2fusion import storage
from cs2fusion.io import InputError

log = logging.getLogger("pipeline.lease")
SUFFIX = ".lease"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no procfs (macOS): signal 0 is all there is
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class RunLease:
    """The lease on ``run_dir`` (kept at ``run_dir`` + ``.lease``, so it survives the folder being moved aside)."""

    def __init__(self, run_dir: str, *, ttl_s: float = 120.0, settle_s: float = 0.5) -> None:
        self.location, self.ttl_s, self.settle_s = run_dir.rstrip("/") + SUFFIX, ttl_s, settle_s
        self.host, self.pid, self.token = socket.gethostname(), os.getpid(), uuid.uuid4().hex
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        text = storage.read_text(self.location)
        try:
            return json.loads(text) if text else None
        except ValueError:  # a torn write: nobody holds it
            return None

    def _write(self) -> None:
        now = time.time()
        storage.write_text(self.location, json.dumps({
            "holder": f"{self.host}:{self.pid}", "host": self.host, "pid": self.pid, "token": self.token,
            "since": getattr(self, "since", now), "expires": now + self.ttl_s}))

    def _stale(self, lease: dict[str, Any]) -> str | None:
        """Why ``lease`` may be taken over, or None while its holder lives."""
        if lease.get("expires", 0) < time.time():
            return "expired (its holder stopped renewing it)"
        if lease.get("host") == self.host and not _alive(int(lease.get("pid", 0))):
            return f"its process {lease.get('pid')} on this host is gone"
        return None

    def acquire(self) -> None:
        """Takes the lease, or raises InputError naming the live holder."""
        current = self.read()
        if current and current.get("token") != self.token:
            why = self._stale(current)
            if why is None:
                until = time.strftime("%H:%M:%S", time.localtime(current["expires"]))
                raise InputError(f"{self.location}: the run is being trained by {current['holder']} (lease renewed "
                                 f"until {until}); a second trainer of the same run is refused")
            log.warning("taking over the lease of %s from %s: %s", self.location, current.get("holder"), why)
        self.since = time.time()
        self._write()
        time.sleep(self.settle_s)
        now = self.read()
        if not now or now.get("token") != self.token:
            holder = now.get("holder") if now else "another trainer"
            raise InputError(f"{self.location}: {holder} started training the same run at the same moment")
        self.thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self.thread.start()

    def _renew(self) -> None:
        while not self.stop.wait(self.ttl_s / 3):
            try:
                self._write()
            except Exception as err:  # a store hiccup: the next renewal retries well before expiry
                log.warning("could not renew the lease %s (%s)", self.location, type(err).__name__)

    def release(self) -> None:
        """Stops renewing and removes the lease if it is still ours."""
        self.stop.set()
        if self.thread:
            self.thread.join(timeout=10)
        current = self.read()
        if current and current.get("token") == self.token:
            storage.remove(self.location)

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
