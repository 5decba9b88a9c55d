"""Stage ``prepare``: find every data set in params, validate each pair, assign splits, write the manifest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.common import clean_errors, parser, setup

from cs2fusion.data.manifest import build_manifest
from cs2fusion.io import write_text

log = logging.getLogger("pipeline.prepare")


@clean_errors
def main() -> None:
    p = parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="manifest file to write (JSON)")
    args = p.parse_args()
    params = setup(args)
    manifest = build_manifest(params.prepare)
    write_text(args.out, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    for name, ds in manifest["datasets"].items():
        log.info("%s: %s (rejected %d)", name, ds["splits"], len(ds["rejected"]))


if __name__ == "__main__":
    main()
