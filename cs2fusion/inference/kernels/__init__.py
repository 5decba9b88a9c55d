"""Compiled CPU kernels (here: the Winograd head), built by PyTorch's C++ extension loader into a cache keyed by the
torch version, the source's hash and everything its build command holds (flags for the CPU capability, the compiler,
the include folders of the environment's torch and Python), so every process of one environment on a machine (CLI,
Ray workers, a model server) loads one build, and a second environment (another checkout's venv, a node's venv on a
shared home folder) gets a build of its own instead of making ninja rebuild the first one's, back and forth.
``cs2fusion build-kernels`` builds it ahead of time. Without a C++ compiler or ninja, or with ``CS2FUSION_NO_KERNELS=1``
(the test override), the kernel is None and callers use library ops.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("winograd_head.cpp")
DISABLE_ENV, CACHE_ENV = "CS2FUSION_NO_KERNELS", "CS2FUSION_KERNEL_CACHE"
STALE_LOCK_S = 900  # a build takes about a minute; a lock this old belongs to no live build
# Instruction sets by PyTorch's CPU capability: named levels, not -march=native, so a shared build cache never
# hands a machine code it cannot run.
_ARCH = {"AVX512": ["-march=x86-64-v4", "-mprefer-vector-width=512"], "AVX2": ["-march=x86-64-v3"]}


def _flags() -> list[str]:
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += _ARCH.get(torch.backends.cpu.get_cpu_capability(), [])
    return flags


def _build_key() -> tuple[str, Path]:
    """(module name, build folder): a change of source, torch, CPU capability, compiler or the environment's include
    folders (what ninja compares in its log) gets its own build."""
    import sysconfig

    from torch.utils import cpp_extension  # imports setuptools: only when a kernel is wanted

    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    capability = torch.backends.cpu.get_cpu_capability().lower()
    command = {"flags": _flags(), "includes": cpp_extension.include_paths(), "python": sysconfig.get_paths()["include"],
               "cxx": shutil.which(os.environ.get("CXX", "c++")), "abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}
    environment = hashlib.sha256(json.dumps(command, sort_keys=True).encode()).hexdigest()[:8]
    base = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cs2fusion"
    torch_version = torch.__version__.replace("+", "_")
    return (f"cs2fusion_winograd_{capability}_{digest}",
            Path(base) / "kernels" / f"torch-{torch_version}" / f"{digest}-{environment}")


def _source_in(folder: Path) -> Path:
    """The source, copied into its (content-addressed) build folder: the build command then names the same file
    whichever copy of the package asks (a checkout, an MLflow model's code folder), so ninja never rebuilds."""
    target = folder / SOURCE.name
    text = SOURCE.read_bytes()
    if not target.is_file() or target.read_bytes() != text:
        tmp = folder / f".{SOURCE.name}.{os.getpid()}.tmp"
        tmp.write_bytes(text)
        os.replace(tmp, target)
    return target


def _missing_tool() -> str | None:
    """What the build needs and this machine lacks, or None."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++, or $CXX)"
    try:
        import ninja  # the pip package (a dependency): always the same ninja, whatever PATH a process has
    except ImportError:
        return None if shutil.which("ninja") else "no ninja (pip install ninja)"
    # Two ninja versions record a command under different hashes in .ninja_log, so a machine with a system ninja
    # rebuilt the kernel (about a minute) each time a process with the other one first on PATH loaded it.
    if not os.environ.get("PATH", "").startswith(ninja.BIN_DIR + os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


@functools.cache
def winograd_head() -> ModuleType | None:
    """The module of ``winograd_head.cpp`` (built once into the cache), or None with the reason logged."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        log.info("compiled kernels disabled by %s: using direct convolutions", DISABLE_ENV)
        return None
    if missing := _missing_tool():
        log.warning("Winograd kernel unavailable (%s): using direct convolutions", missing)
        return None
    from torch.utils import cpp_extension  # imports setuptools: only when a kernel is wanted

    name, folder = _build_key()
    folder.mkdir(parents=True, exist_ok=True)
    source = _source_in(folder)
    lock = folder / "lock"  # torch's build lock: a build killed midway leaves it, and every later load would wait
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing a stale build lock %s (left by an interrupted build)", lock)
        lock.unlink(missing_ok=True)
    if not (folder / f"{name}.so").is_file():
        log.info("building the Winograd kernel into %s (once per environment and machine: about a minute)", folder)
    try:
        return cpp_extension.load(name, [str(source)], extra_cflags=_flags(), extra_ldflags=["-fopenmp"],
                                  build_directory=str(folder))
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as err:  # a failed build
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("Winograd kernel unavailable, using direct convolutions: %s", reason)
        return None


def build_location() -> Path:
    """Where this machine's build of the kernel lives (or will)."""
    return _build_key()[1]
