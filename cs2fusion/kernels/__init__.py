"""Compiled CPU kernels, built once per machine by PyTorch's C++ extension loader (a C++ compiler with OpenMP and
ninja are needed); a kernel that cannot be built is None and callers use library ops instead."""

from __future__ import annotations

import functools
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCES = Path(__file__).parent
# Instruction sets by PyTorch's CPU capability: named levels, not -march=native, so a shared build cache never
# hands a machine code it cannot run.
_ARCH = {"AVX512": ["-march=x86-64-v4", "-mprefer-vector-width=512"], "AVX2": ["-march=x86-64-v3"]}


@functools.cache
def winograd_head() -> ModuleType | None:
    """The module of ``winograd_head.cpp``, or None (with a warning) where it cannot be built."""
    from torch.utils import cpp_extension  # imports setuptools: only when a kernel is wanted

    if shutil.which("ninja") is None and (ninja_dir := _pip_ninja_dir()):  # the environment's bin/ is not on PATH
        os.environ["PATH"] = ninja_dir + os.pathsep + os.environ.get("PATH", "")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _ARCH.get(capability, [])
    log.info("loading the Winograd kernel (built on first use per machine: about a minute)")
    try:
        return cpp_extension.load(f"cs2fusion_winograd_{capability.lower()}", [str(SOURCES / "winograd_head.cpp")],
                                  extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as err:  # no compiler/ninja, a failed build
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("Winograd kernel unavailable, using direct convolutions: %s", reason)
        return None


def _pip_ninja_dir() -> str | None:
    """Where the ninja pip package keeps its binary, if it is installed."""
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR
