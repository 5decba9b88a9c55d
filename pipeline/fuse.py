"""Stage ``fuse``: every evaluation set, fused by our model and by the published weights (baseline).

Writes ``<out>/<method>/<set>/<id>.png``. Attached to a Ray cluster (``RAY_ADDRESS``), each shard is a Ray task on
any node: the models travel as bytes, the shards are read where they are (an object store or a shared path), the
images come back here; otherwise shards run in this process.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cs2fusion.checkpoint import save_checkpoint
from cs2fusion.config import FuseParams
from cs2fusion.data.shards import read_index, set_files, set_prefix
from cs2fusion.inference.batch import PUBLISHED, fuse_shards, fused_samples, load_backbone
from cs2fusion.io import atomic_dir, write_png
from pipeline import cluster
from pipeline.common import absolute, clean_errors, location, parser, setup

log = logging.getLogger("pipeline.fuse")


def methods(model: Path, params: FuseParams) -> dict[str, str]:
    """Method name → model spec; the published baseline only where its folder exists."""
    out = {"ours": str(model.resolve())}
    published = Path(params.published)
    if (published / "backbone.pt").is_file():
        out["published"] = PUBLISHED + str(published.resolve())
    else:
        log.warning("published weights not found at %s: baseline skipped", published)
    return out


def _model_bytes(spec: str) -> bytes:
    """The model of ``spec`` as checkpoint bytes: what a task on any node can load without this machine's files."""
    if not spec.startswith(PUBLISHED):
        return Path(spec).read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "published.safetensors", load_backbone(spec), source=spec)
        return (Path(tmp) / "published.safetensors").read_bytes()


def _fuse_task(model: bytes, shard: str, params: FuseParams) -> list[tuple[str, np.ndarray]]:
    """A Ray task: one shard fused on whichever node runs it; the images come back to the driver."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "model.safetensors").write_bytes(model)
        return list(fused_samples(str(Path(tmp) / "model.safetensors"), [shard], params))


def _on_ray(jobs: list[tuple[str, list[str], Path]], params: FuseParams) -> None:
    import ray

    cluster.init()
    models = {spec: ray.put(_model_bytes(spec)) for spec in sorted({spec for spec, _, _ in jobs})}
    task = ray.remote(num_cpus=1)(_fuse_task)
    pending = {task.remote(models[spec], shard, params): out for spec, files, out in jobs for shard in files}
    count = 0
    with tqdm(total=len(pending), desc="fusing shards on the Ray cluster", unit="shard", disable=None) as bar:
        while pending:
            (done,), _ = ray.wait(list(pending))
            out = pending.pop(done)
            for pair_id, fused in ray.get(done):
                write_png(out / f"{pair_id}.png", fused)
                count += 1
            bar.update()
    log.info("fused %d images on the Ray cluster", count)


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from the train stage")
    p.add_argument("--shards", type=location, required=True, help="shard folder or s3:// prefix (evaluation sets)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args()
    params = setup(args)
    shards, out = absolute(args.shards), args.out.resolve()
    cluster.check_stores(params, shards=shards)
    sets = [name for name, s in read_index(shards)["sets"].items() if s["kind"] == "eval"]
    with atomic_dir(out, "fuse", inputs=(shards, args.model)) as tmp:
        jobs = [(spec, set_files(shards, name), tmp / method / set_prefix(name))
                for method, spec in methods(args.model, params.fuse).items() for name in sets]
        if cluster.attached():
            _on_ray(jobs, params.fuse)
        else:
            for spec, files, out in jobs:
                fuse_shards(spec, files, out, params.fuse)


if __name__ == "__main__":
    main()
