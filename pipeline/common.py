"""What every stage script shares: logging, the params file, a one-line error exit."""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from pathlib import Path
from typing import Callable

from cs2fusion.config import Params, ParamsError, load_params
from cs2fusion.io import InputError


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the shared ``--params`` option."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    return p


def setup(args: argparse.Namespace) -> Params:
    """Logging on, params loaded."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_params(args.params)


def clean_errors(main: Callable[[], None]) -> Callable[[], None]:
    """Bad input or params end the stage with one line naming the culprit and exit status 2."""

    @functools.wraps(main)
    def wrapper() -> None:
        try:
            main()
        except (InputError, ParamsError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
