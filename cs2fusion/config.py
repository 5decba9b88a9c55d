"""One typed configuration, loaded from ``params.yaml`` and passed down explicitly.

Every section of ``params.yaml`` is a frozen dataclass; :func:`load_params` rejects unknown keys and values of
the wrong type, so a typo in a parameter fails loudly instead of silently falling back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

log = logging.getLogger(__name__)


class ParamsError(ValueError):
    """A parameter file that does not match the typed configuration."""


def _require(checks: dict[str, bool]) -> None:
    """Raises ParamsError naming the first field whose check is false (ranges the types cannot express)."""
    for name, ok in checks.items():
        if not ok:
            raise ParamsError(f"{name}: out of range")


# The main metrics, higher is better for each (cs2fusion.metrics computes them; the gate and `select` name them).
MAIN_METRICS = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


def set_parts(name: str) -> list[str]:
    """The sets ``<dataset>/<split>`` a set name stands for: itself, or each part of a union ``a/x+b/y``."""
    return name.split("+")


def spell_union(text: str) -> str:
    """``text`` with each union's ``+`` spelled ``_and_``, for names that refuse ``+`` (shard files, MLflow metrics)."""
    return text.replace("+", "_and_")


# train keys of the flat layout (before train.loss / scaling / tracking): still read, into their sections
MOVED_TRAIN_KEYS = {**{k: ("loss", k) for k in ("alpha", "impaired_weight", "intensity", "ssim_weight", "max_weight",
                                               "grad_weight")},
                    **{k: ("scaling", k) for k in ("num_workers", "use_gpu", "cpus_per_worker", "threads_per_worker",
                                                  "loader_workers", "worker_resources", "max_failures",
                                                  "collective_timeout_s")},
                    "experiment": ("tracking", "experiment"), "log_every": ("tracking", "log_every"),
                    "tracking_patience_s": ("tracking", "patience_s")}
# model.map_norm names that encoded the spread (still read)
OLD_MAP_NORMS = {"robust_tight": 1.0, "robust_sharp": 0.5}


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """Architecture of the backbone and the CPN (defaults = the published CS2Fusion)."""

    channels: int = 16
    negative_slope: float = 0.01
    input_scale: float = 255.0
    # "sample": per-sample min-max / mean inside the CPN (a sample's map is independent of its batch);
    # "batch": over the whole batch tensor, as the original release does.
    norm_scope: Literal["sample", "batch"] = "sample"
    # the CPN's map: "minmax" (the release's: its extremes set the range, so the contrastive losses can push almost
    # every pixel to 1) or "robust" (range mean ± map_spread·std, clamped: no handful of extremes sets it; spread 2
    # holds a two-level map at 0.25–0.75, 1 spans 0–1, 0.5 sends most pixels to 0 or 1; docs/research/recipe.md).
    # The old names robust_tight (spread 1) and robust_sharp (0.5) still load.
    map_norm: Literal["minmax", "robust"] = "minmax"
    map_spread: float = 2.0

    @staticmethod
    def upgrade(data: dict[str, Any], where: str) -> dict[str, Any]:
        """``map_norm: robust_tight`` / ``robust_sharp`` read as ``robust`` with their spread."""
        if data.get("map_norm") not in OLD_MAP_NORMS:
            return data
        spread = OLD_MAP_NORMS[data["map_norm"]]
        if data.get("map_spread", spread) != spread:
            raise ParamsError(f"{where}.map_norm: {data['map_norm']!r} means map_spread {spread}, "
                              f"not {data['map_spread']}")
        return {**data, "map_norm": "robust", "map_spread": spread}

    def __post_init__(self) -> None:
        _require({"channels (>= 1)": self.channels >= 1, "input_scale (> 0)": self.input_scale > 0,
                  "negative_slope (>= 0)": self.negative_slope >= 0, "map_spread (> 0)": self.map_spread > 0})


@dataclasses.dataclass(frozen=True)
class ImpairParams:
    """The "visually impaired" view: random rectangles of the visible image cut out (set to ``fill``)."""

    regions: int = 3
    min_frac: float = 0.1
    max_frac: float = 0.3
    fill: float = 0.0

    def __post_init__(self) -> None:
        _require({"regions (>= 0)": self.regions >= 0,
                  "min_frac, max_frac (0 <= min_frac <= max_frac <= 1)": 0 <= self.min_frac <= self.max_frac <= 1})


@dataclasses.dataclass(frozen=True)
class SynthParams:
    """The built-in demo data set (``cs2fusion synth``): a demo only, never for quality claims."""

    out: str = "data/demo"
    pairs: int = 16
    width: int = 160
    height: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        _require({"pairs (>= 1)": self.pairs >= 1, "width (>= 16)": self.width >= 16,
                  "height (>= 16)": self.height >= 16})


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One data set in its native layout, and how its pairs are split.

    Split precedence: ``lists`` (split name → list file of ids; pairs in no list are "unused"), else ``ratio``
    (split name → fraction, seeded), else the layout's native split (MSRS, LLVIP), else ``default_split``.
    """

    name: str
    root: str
    layout: str = "auto"
    lists: dict[str, str] = dataclasses.field(default_factory=dict)
    ratio: dict[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    default_split: str = "test"


@dataclasses.dataclass(frozen=True)
class PrepareParams:
    """``prepare`` stage: data sets to find and validate; ``strict`` fails on any bad pair, ``skip`` drops it."""

    datasets: tuple[DatasetSpec, ...] = ()
    policy: Literal["strict", "skip"] = "strict"


@dataclasses.dataclass(frozen=True)
class ShardParams:
    """``shard`` stage: training patches and whole-image evaluation sets as WebDataset shards.

    ``train`` / ``eval`` name ``<dataset>/<split>`` of the manifest (``a/x+b/y``: the union, one set). Patches are
    cut on a ``stride`` grid; ``max_patches_per_image`` (0 = all) keeps a seeded random subset per image,
    ``max_patches_by_set`` overrides it for the named training sets (balancing sets of unlike image sizes). Each set
    is written as a multiple of ``shard_multiple`` shards of near-equal size (≤ ``max_samples_per_shard``) so that
    ranks × loader workers get equal shares.
    """

    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    patch_size: int = 128
    stride: int = 64
    max_patches_per_image: int = 0
    max_patches_by_set: dict[str, int] = dataclasses.field(default_factory=dict)
    max_samples_per_shard: int = 512
    shard_multiple: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        _require({"patch_size (>= 8)": self.patch_size >= 8, "stride (>= 1)": self.stride >= 1,
                  "max_patches_per_image (>= 0)": self.max_patches_per_image >= 0,
                  "max_patches_by_set (each >= 0)": all(v >= 0 for v in self.max_patches_by_set.values()),
                  "max_patches_by_set (training sets only)": set(self.max_patches_by_set) <= {
                      part for name in self.train for part in set_parts(name)},
                  "max_samples_per_shard (>= 1)": self.max_samples_per_shard >= 1,
                  "shard_multiple (>= 1)": self.shard_multiple >= 1})


@dataclasses.dataclass(frozen=True)
class LossParams:
    """``train.loss``: the terms of the two losses (defaults = the release's; docs/training.md)."""

    # the contrastive losses: rank decay α and the weight k of the impaired view's term
    alpha: float = 0.25
    impaired_weight: float = 2.0
    # the backbone's intensity terms: "norm" the release's ‖w·(F − S)‖ over the batch (its minimum is a copy of the
    # more weighted source); "mse": mean of (w·(F − S))², least at the per-pixel weighted mean; "l1": mean of
    # |w·(F − S)|, least at the per-pixel more weighted source
    intensity: Literal["norm", "mse", "l1"] = "norm"
    # λ of the two SSIM terms beside the intensity terms (the release: 1, where they barely count)
    ssim_weight: float = 1.0
    # μ of a max-intensity term d(F − max(ir, vis)) (not the paper's; 0: off)
    max_weight: float = 0.0
    # γ of a max-gradient term |∇F| vs max(|∇ir|, |∇vis|) (not the paper's; 0: off)
    grad_weight: float = 0.0
    # κ of a local-contrast term σ(F) vs max(σ(ir), σ(vis)), σ over contrast_window² pixels (not the paper's; 0: off)
    contrast_weight: float = 0.0
    contrast_window: int = 9
    # s of the max-intensity, max-gradient and local-contrast targets: a gain about each sample's mean (1: the sources')
    target_gain: float = 1.0

    def __post_init__(self) -> None:
        _require({"alpha (>= 0)": self.alpha >= 0, "impaired_weight (>= 0)": self.impaired_weight >= 0,
                  "ssim_weight (>= 0)": self.ssim_weight >= 0, "max_weight (>= 0)": self.max_weight >= 0,
                  "grad_weight (>= 0)": self.grad_weight >= 0, "contrast_weight (>= 0)": self.contrast_weight >= 0,
                  "contrast_window (odd, >= 3)": self.contrast_window >= 3 and self.contrast_window % 2 == 1,
                  "target_gain (> 0)": self.target_gain > 0})


@dataclasses.dataclass(frozen=True)
class ScalingParams:
    """``train.scaling``: the Ray cluster's shape for training; any shape trains the same model (docs/distributed.md).

    ``num_workers`` may be a range ``[min, max]`` (elastic: a run that loses workers continues on fewer from its
    latest checkpoint). ``worker_resources``: custom Ray resources each training worker needs besides its CPUs / GPU
    (e.g. ``{trainer_slot: 1}`` to place workers on the nodes that offer it).
    """

    num_workers: int | tuple[int, ...] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    loader_workers: int = 1
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    max_failures: int = 1
    collective_timeout_s: int = 300

    @property
    def worker_range(self) -> tuple[int, ...]:
        """(min, max) workers: a fixed count is (n, n)."""
        return (self.num_workers,) * 2 if isinstance(self.num_workers, int) else tuple(self.num_workers)

    @property
    def elastic(self) -> bool:
        return self.worker_range[0] != self.worker_range[-1]

    def __post_init__(self) -> None:
        _require({
            "num_workers (a count >= 1, or a range [min, max] with 1 <= min <= max)":
                len(self.worker_range) == 2 and 1 <= self.worker_range[0] <= self.worker_range[-1],
            "cpus_per_worker (> 0)": self.cpus_per_worker > 0, "loader_workers (>= 0)": self.loader_workers >= 0,
            "threads_per_worker (>= 1)": self.threads_per_worker >= 1, "max_failures (>= -1)": self.max_failures >= -1,
            "collective_timeout_s (>= 1)": self.collective_timeout_s >= 1,
            "worker_resources (amounts > 0)": all(v > 0 for v in self.worker_resources.values()),
        })


@dataclasses.dataclass(frozen=True)
class RunTrackingParams:
    """``train.tracking``: the training run's MLflow experiment, its per-step logging interval, and how long a finished
    run waits for an unreachable tracking server before it writes the unsent metrics beside its checkpoints."""

    experiment: str = "cs2fusion"
    log_every: int = 10
    patience_s: int = 600

    def __post_init__(self) -> None:
        _require({"log_every (>= 1)": self.log_every >= 1, "patience_s (>= 0)": self.patience_s >= 0,
                  "experiment (not empty)": bool(self.experiment)})


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """``train`` stage: the paper's recipe by default; the losses' terms in ``loss``, the cluster in ``scaling``, the
    MLflow run in ``tracking``.

    ``batch_size`` is the global batch, split over the workers (equal parts, or one sample apart where they do not
    divide it): every term that spans the batch spans the global batch (:mod:`cs2fusion.span`).
    ``max_steps_per_epoch`` (0 = the full epoch) shortens runs. ``init_from`` starts the backbone (and CPN, if
    stored) from a cs2fusion checkpoint. ``resume``: ``auto`` continues the run in ``storage_path/run_name`` from its
    latest checkpoint when its params, shards and training code are the same (else that folder is moved aside, never
    deleted), ``never`` moves it aside, ``must`` continues the same params and shards even across code changes (a
    long run) and fails without such a run. ``storage_path``: a folder or an object-store URL (``s3://…``) for Ray's
    checkpoints and the run's state. ``val_every`` / ``select`` / ``keep``: validation metrics of ``val_set`` every
    that many epochs, the score that ranks checkpoints (``composite`` or one main metric; :mod:`cs2fusion.validation`)
    and whether the final model is the best-scoring checkpoint or the last. ``precision`` / ``fast_losses``: the fast
    path (docs/training.md).
    """

    epochs: int = 20
    resume: Literal["auto", "never", "must"] = "auto"
    batch_size: int = 16
    lr_backbone: float = 2e-3
    lr_cpn: float = 2e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    milestones: tuple[int, ...] = (5, 10, 15)
    gamma: float = 0.1
    loss: LossParams = dataclasses.field(default_factory=LossParams)
    # which source the CPN's map m (first slot) goes with: "roles" infrared, "literal" visible (docs/conventions.md)
    step_order: Literal["roles", "literal"] = "roles"
    # fast path: bf16 forward under autocast where the hardware has bf16 (fp32 otherwise, logged); Gram similarities
    precision: Literal["fp32", "bf16"] = "fp32"
    fast_losses: bool = False
    seed: int = 0
    max_steps_per_epoch: int = 0
    shuffle_buffer: int = 256
    init_from: str = ""
    checkpoint_every: int = 1
    storage_path: str = "runs"
    run_name: str = "train"
    val_set: str = ""
    val_samples: int = 4
    val_every: int = 1
    select: Literal[("composite", *MAIN_METRICS)] = "composite"  # type: ignore[valid-type]
    keep: Literal["best", "last"] = "best"
    scaling: ScalingParams = dataclasses.field(default_factory=ScalingParams)
    tracking: RunTrackingParams = dataclasses.field(default_factory=RunTrackingParams)

    @staticmethod
    def upgrade(data: dict[str, Any], where: str) -> dict[str, Any]:
        """The flat layout (``train.alpha``, ``train.num_workers``, …) read into its sections, with a warning."""
        data = dict(data)
        for key in [k for k in data if k in MOVED_TRAIN_KEYS]:
            section, name = MOVED_TRAIN_KEYS[key]
            part = data.setdefault(section, {})
            if not isinstance(part, dict) or name in part:
                raise ParamsError(f"{where}.{key}: also set as {where}.{section}.{name}; keep the latter")
            data[section] = {**part, name: data.pop(key)}
            log.warning("%s.%s: read as %s.%s (the flat layout is deprecated)", where, key, section, name)
        return data

    def __post_init__(self) -> None:
        _require({
            "epochs (>= 1)": self.epochs >= 1, "batch_size (>= 1)": self.batch_size >= 1,
            "lr_backbone (> 0)": self.lr_backbone > 0, "lr_cpn (> 0)": self.lr_cpn > 0,
            "betas (two values in [0, 1))": len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "gamma (> 0)": self.gamma > 0, "max_steps_per_epoch (>= 0)": self.max_steps_per_epoch >= 0,
            "shuffle_buffer (>= 1)": self.shuffle_buffer >= 1,
            "checkpoint_every (>= 1)": self.checkpoint_every >= 1, "val_samples (>= 0)": self.val_samples >= 0,
            "val_every (>= 1)": self.val_every >= 1,
            "checkpoint_every (a multiple of val_every: every checkpoint has a score)":
                self.val_every < 1 or self.checkpoint_every % self.val_every == 0,
            "batch_size (at least the most scaling.num_workers: every worker holds a sample)":
                self.batch_size >= self.scaling.worker_range[-1],
            "storage_path (not empty)": bool(self.storage_path), "run_name (a plain name)": _plain(self.run_name),
        })


@dataclasses.dataclass(frozen=True)
class ClusterParams:
    """Runs attached to a Ray cluster (``RAY_ADDRESS``): the code and the environment are shipped to the nodes, and
    the stores must be reachable from every node. ``shared_fs: true`` says the local paths in use (shards,
    ``train.storage_path``, the embedded MLflow store) are on a file system every node mounts at the same path."""

    shared_fs: bool = False


@dataclasses.dataclass(frozen=True)
class FuseParams:
    """``fuse`` stage: every evaluation set of the shard stage, by our model and the published baseline.

    ``published``: folder of the release's weights; skipped with a warning when it does not exist (the demo
    quick start runs anywhere). ``tile``/``max_pixels``: exact tiled inference above that many pixels.
    ``winograd``: the CPU head (fp32, and bf16 where the CPU has bf16 products) as the compiled Winograd kernel
    (built once per machine; falls back to direct convs where no compiler is found).
    """

    published: str = "../shared/reference/cs2fusion-published"
    precision: Literal["fp32", "bf16"] = "fp32"
    tile: int = 512
    max_pixels: int = 4_000_000
    winograd: bool = True
    threads: int = 0

    def __post_init__(self) -> None:
        _require({"tile (0 or >= 16)": self.tile == 0 or self.tile >= 16,
                          "max_pixels (>= 1)": self.max_pixels >= 1, "threads (>= 0)": self.threads >= 0})


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    """``evaluate`` stage: metrics per image and method, the comparison table and visual report. ``peers``: an
    evaluation set → a folder of other methods' published outputs (``<method>/<id>.png``) ranked beside ours in that
    set's leaderboard; ``crops``: pairs per set shown as the same centred crop across every method."""

    primary_set: str = ""
    report_samples: int = 4
    peers: dict[str, str] = dataclasses.field(default_factory=dict)
    crops: int = 4
    crop_size: int = 128

    def __post_init__(self) -> None:
        _require({"report_samples (>= 0)": self.report_samples >= 0, "crops (>= 0)": self.crops >= 0,
                  "crop_size (>= 16)": self.crop_size >= 16})


def _plain(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\")


@dataclasses.dataclass(frozen=True)
class RegisterParams:
    """``register`` stage: registry name, aliases and the promotion gate.

    The challenger becomes champion when it beats the champion on at least ``min_wins`` of ``gate_metrics``
    (higher is better for all of them) on the evaluation's primary set; the first model always becomes champion.
    """

    model_name: str = "cs2fusion"
    gate_metrics: tuple[str, ...] = MAIN_METRICS
    min_wins: int = 5

    def __post_init__(self) -> None:
        unknown = sorted(set(self.gate_metrics) - set(MAIN_METRICS))
        if unknown or not self.gate_metrics:
            raise ParamsError(f"register.gate_metrics: {unknown or 'empty'}; choose from {list(MAIN_METRICS)} "
                              "(higher is better for each)")
        _require({f"min_wins (1 to {len(self.gate_metrics)}, the number of gate_metrics)":
                              1 <= self.min_wins <= len(self.gate_metrics),
                              "model_name (not empty)": bool(self.model_name)})


@dataclasses.dataclass(frozen=True)
class TrackingParams:
    """MLflow: empty ``uri`` = the embedded local store ``mlflow.db`` + ``mlartifacts/`` in the project."""

    uri: str = ""
    artifact_root: str = "mlartifacts"


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``; sections are added by the stages that read them."""

    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    impair: ImpairParams = dataclasses.field(default_factory=ImpairParams)
    synth: SynthParams = dataclasses.field(default_factory=SynthParams)
    prepare: PrepareParams = dataclasses.field(default_factory=PrepareParams)
    shard: ShardParams = dataclasses.field(default_factory=ShardParams)
    train: TrainParams = dataclasses.field(default_factory=TrainParams)
    fuse: FuseParams = dataclasses.field(default_factory=FuseParams)
    evaluate: EvaluateParams = dataclasses.field(default_factory=EvaluateParams)
    register: RegisterParams = dataclasses.field(default_factory=RegisterParams)
    tracking: TrackingParams = dataclasses.field(default_factory=TrackingParams)
    cluster: ClusterParams = dataclasses.field(default_factory=ClusterParams)

    def __post_init__(self) -> None:
        """Names that refer to other sections must exist there: caught here, not inside Ray workers."""
        evaluated = set(self.shard.eval)
        if self.train.val_set and self.train.val_set not in evaluated:
            raise ParamsError(f"train.val_set: {self.train.val_set!r} is not one of shard.eval {sorted(evaluated)}")
        if self.evaluate.primary_set and self.evaluate.primary_set not in evaluated:
            raise ParamsError(f"evaluate.primary_set: {self.evaluate.primary_set!r} is not one of shard.eval "
                              f"{sorted(evaluated)}")




def _check_type(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(hint, value, where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ParamsError(f"{where}: {value!r} is not one of {typing.get_args(hint)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError("; ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        key_type, value_type = typing.get_args(hint)
        return {_check_type(k, key_type, where): _check_type(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{where}: expected true/false, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ParamsError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def build(cls: type, data: dict[str, Any], where: str = "params") -> Any:
    """Builds dataclass ``cls`` from a mapping, recursively, rejecting unknown keys and wrong types."""
    if hasattr(cls, "upgrade"):
        data = cls.upgrade(data, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ParamsError as err:
        raise ParamsError(f"{where}: {err}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such params file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"{path}: unreadable ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}{at}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    if not data:  # every stage would silently run on the built-in defaults, over what an earlier run wrote
        sections = ", ".join(f.name for f in dataclasses.fields(Params))
        raise ParamsError(f"{path}: no sections (empty params file); expected some of {sections}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_params(path: str | Path, *overrides: str | Path) -> Params:
    """Reads ``params.yaml`` into :class:`Params`; each of ``overrides`` (e.g. a recipe phase's file) is merged over
    it in turn (:func:`merge`)."""
    data: dict[str, Any] = {}
    for each in (path, *overrides):
        data = merge(data, _read_yaml(Path(each)))
    return build(Params, data, where=" + ".join(str(p) for p in (path, *overrides)))


def to_dict(params: Any) -> dict[str, Any]:
    """The plain-dict form of a params dataclass (for metadata and logging)."""
    return dataclasses.asdict(params)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (MLflow params, DVC ``-S`` keys)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
