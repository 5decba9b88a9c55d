"""DVC deps tell the truth: every project file a stage's code imports (transitively, function-level imports too) is
covered by that stage's deps, in the main ``dvc.yaml`` and every preset; and ``params.yaml`` lists every knob."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from cs2fusion.config import Params
from tests.conftest import REPO

PACKAGES = ("cs2fusion", "pipeline")
DVC_FILES = [REPO / "dvc.yaml", *sorted(REPO.glob("presets/*/dvc.yaml"))]


def module_file(name: str) -> Path | None:
    """The repository file of module ``name`` (a package's ``__init__.py``), or None outside the project."""
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, package: str) -> set[str]:
    """Project modules named by every import statement of ``path`` (``from a import b``: ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES and module_file(n)}


def closure(module: str) -> set[Path]:
    """Files of ``module`` and of everything it imports, with every parent package's ``__init__.py``."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parent = ".".join(parts[:k])
            if parent not in seen and module_file(parent):
                seen.add(parent)
                path = module_file(parent)
                package = parent if path.name == "__init__.py" else ".".join(parent.split(".")[:-1])
                todo.extend(imported_modules(path, package) - seen)
    files = {module_file(n) for n in seen}
    for f in list(files):  # compiled sources loaded at run time beside their Python module
        files.update(p for p in f.parent.glob("*.cpp"))
    return files


def stages() -> list[tuple[str, str, str, list[Path]]]:
    """(dvc file, stage, module, dep paths resolved against the stage's wdir) of every ``python -m`` stage."""
    out = []
    for dvc_file in DVC_FILES:
        for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
            cmd = " ".join(stage["cmd"].split())
            if not cmd.startswith("python -m "):
                continue
            wdir = (dvc_file.parent / stage.get("wdir", ".")).resolve()
            deps = [(wdir / d).resolve() for d in stage.get("deps", [])]
            out.append((str(dvc_file.relative_to(REPO)), name, cmd.split()[2], deps))
    return out


@pytest.mark.parametrize("dvc_file, stage, module, deps", stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_stage_deps_cover_its_import_closure(dvc_file: str, stage: str, module: str, deps: list[Path]) -> None:
    missing = sorted(str(f.relative_to(REPO)) for f in closure(module)
                     if not any(f == d or f.is_relative_to(d) for d in deps))
    assert not missing, f"{dvc_file} stage {stage}: deps miss {missing}"
    code = [d for d in deps if any(d.is_relative_to(REPO / p) for p in PACKAGES)]
    absent = [str(d.relative_to(REPO)) for d in code if not d.exists()]
    assert not absent, f"{dvc_file} stage {stage}: code deps that do not exist {absent}"


def test_closure_follows_function_level_and_package_imports() -> None:
    files = {str(f.relative_to(REPO)) for f in closure("pipeline.train")}
    assert {"pipeline/mlflow_adapter.py", "cs2fusion/__init__.py", "cs2fusion/inference/graph.py",
            "cs2fusion/inference/kernels/winograd_head.cpp", "cs2fusion/color.py", "cs2fusion/config.py"} <= files


def _knobs(cls: type, prefix: str) -> set[str]:
    """Every key path of a params dataclass (nested dataclasses expanded, list items of dataclasses too)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], f"{prefix}{field.name}"
        item = (typing.get_args(hint) or (None,))[0]
        if dataclasses.is_dataclass(hint):
            out |= _knobs(hint, f"{key}.")
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(item):
            out |= _knobs(item, f"{key}[].")
        else:
            out.add(key)
    return out


def _keys(data: object, prefix: str = "") -> set[str]:
    if isinstance(data, dict) and not prefix.endswith(("ratio.", "lists.")):
        return {k for key, v in data.items() for k in _keys(v, f"{prefix}{key}.")} | {prefix.rstrip(".")} - {""}
    if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
        return set.union(*(_keys(d, f"{prefix.rstrip('.')}[].") for d in data)) | {prefix.rstrip(".")}
    return {prefix.rstrip(".")}


def test_params_yaml_lists_every_knob() -> None:
    written = _keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    missing = sorted(_knobs(Params, "") - written)
    assert not missing, f"params.yaml lacks {missing} (README: every knob lives there)"
