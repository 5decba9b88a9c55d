"""Stage ``synth``: the built-in demo data set (a demo only, never for quality claims)."""

from __future__ import annotations

from pipeline.common import clean_errors, parser, setup

from cs2fusion.data.synth import write_demo


@clean_errors
def main() -> None:
    params = setup(parser(__doc__).parse_args())
    write_demo(params.synth)


if __name__ == "__main__":
    main()
