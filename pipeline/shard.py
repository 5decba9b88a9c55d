"""Stage ``shard``: training patches and whole-image evaluation sets as WebDataset shards + ``shards.json``."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.common import clean_errors, location, parser, setup

from cs2fusion.data.manifest import read_manifest
from cs2fusion.data.shards import write_shards

log = logging.getLogger("pipeline.shard")


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--manifest", type=Path, required=True, help="manifest from the prepare stage")
    p.add_argument("--out", type=location, required=True, help="shard folder or s3:// prefix to (re)write")
    args = p.parse_args()
    params = setup(args)
    index = write_shards(read_manifest(args.manifest), params.shard, args.out, inputs=(args.manifest,))
    for name, s in index["sets"].items():
        log.info("%s: %d samples in %d shards", name, s["samples"], len(s["shards"]))


if __name__ == "__main__":
    main()
