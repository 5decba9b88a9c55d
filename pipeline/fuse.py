"""Stage ``fuse``: every evaluation set, fused by our model and by the published weights (baseline).

Writes ``<out>/<method>/<set>/<id>.png``. With ``RAY_ADDRESS`` set, each shard is a Ray task on the cluster
(shared storage assumed); otherwise shards run in this process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cs2fusion.config import FuseParams
from cs2fusion.data.shards import read_index, set_files, set_prefix
from cs2fusion.inference.batch import PUBLISHED, fuse_shards
from cs2fusion.io import atomic_dir
from pipeline.common import clean_errors, parser, setup

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


def _on_ray(jobs: list[tuple[str, list[str], Path]], params: FuseParams) -> None:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], ignore_reinit_error=True)
    task = ray.remote(num_cpus=1)(fuse_shards)
    counts = ray.get([task.remote(spec, [f], out, params, progress=False) for spec, files, out in jobs for f in files])
    log.info("fused %d images on the Ray cluster", sum(counts))


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", type=Path, required=True, help="checkpoint from the train stage")
    p.add_argument("--shards", type=Path, required=True, help="shard folder (evaluation sets)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args()
    params = setup(args)
    shards, out = args.shards.resolve(), args.out.resolve()  # Ray workers do not share this working folder
    sets = [name for name, s in read_index(shards)["sets"].items() if s["kind"] == "eval"]
    with atomic_dir(out, "fuse", inputs=(shards, args.model)) as tmp:
        jobs = [(spec, set_files(shards, name), tmp / method / set_prefix(name))
                for method, spec in methods(args.model, params.fuse).items() for name in sets]
        if os.environ.get("RAY_ADDRESS"):
            _on_ray(jobs, params.fuse)
        else:
            for spec, files, out in jobs:
                fuse_shards(spec, files, out, params.fuse)


if __name__ == "__main__":
    main()
