"""What every stage script shares: logging, the params file, a one-line error exit."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

from cs2fusion.config import Params, ParamsError, load_params
from cs2fusion.io import InputError, os_error_line
from cs2fusion.storage import is_url

VERBOSE_ENV = "CS2FUSION_VERBOSE"
NOISY_LOGGERS = ("mlflow", "matplotlib", "ray", "alembic", "urllib3", "filelock")


def verbose() -> bool:
    """``-v`` on a stage (or ``CS2FUSION_VERBOSE=1``): Ray's, MLflow's and the libraries' own logs come back."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def location(text: str) -> str | Path:
    """An argument that may be a path or an object-store URL (``s3://…``: ``Path`` would fold its ``//``)."""
    return text if is_url(text) else Path(text)


def absolute(place: str | Path) -> str:
    """URLs as they are; paths absolute (Ray workers run in another folder)."""
    return str(place) if is_url(place) else str(Path(place).resolve())


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the shared ``--params`` and ``-v`` options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, action="append",
                   help="params file (default: params.yaml); given again, each later file is merged over the "
                        "earlier ones (a recipe phase's overrides)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help=f"show Ray's, MLflow's and the libraries' logs too (or {VERBOSE_ENV}=1)")
    return p


def setup(args: argparse.Namespace) -> Params:
    """Logging on (our lines only, unless verbose), params loaded."""
    setup_logging(args)
    return load_params(*(args.params or [Path("params.yaml")]))


def setup_logging(args: argparse.Namespace) -> None:
    """Logging on: our lines only, unless ``-v``."""
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"  # also for the processes this stage starts
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not verbose():
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow sets its own level on import


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: a stage ends as on Ctrl-C (its MLflow run KILLED, Ray shut down)."""


_SIGTERM = threading.Event()


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Stopped` in the main thread (the default would end the process at once).
    Code that turns it into a plain KeyboardInterrupt (Ray's blocking calls do) asks :func:`stopped_by_sigterm`."""

    def stop(signum: int, frame: object) -> None:
        _SIGTERM.set()
        raise Stopped("stopped by SIGTERM")

    if threading.current_thread() is threading.main_thread():  # not in a sweep's trial (Tune runs it in a thread)
        signal.signal(signal.SIGTERM, stop)


def stopped_by_sigterm() -> bool:
    return _SIGTERM.is_set()


def clean_errors(main: Callable[[], None]) -> Callable[[], None]:
    """Bad input, params or a failed write end the stage with one line naming the culprit and exit status 2
    (the traceback too with ``-v``); SIGTERM with one line and the status 128 + 15 a killed process has."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except Stopped as err:
            print(f"error: {err}; rerun the stage to continue from the latest checkpoint", file=sys.stderr)
            sys.exit(128 + signal.SIGTERM)
        except (InputError, ParamsError, OSError) as err:
            if verbose():
                traceback.print_exc()
            line = os_error_line(err) if isinstance(err, OSError) else str(err)
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)

    return wrapper
