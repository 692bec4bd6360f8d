"""The sample city's command line: ``python -m data_samples generate|load``.

twin's own CLI (``twin sample …``, ``twin run``) runs this in a child process: production
code never imports the sample generator.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from twin.core.errors import TwinError
from twin.core.settings import get_settings

log = logging.getLogger("twin.sample")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_samples", description=__doc__)
    commands = parser.add_subparsers(dest="action", required=True)
    generate = commands.add_parser("generate", help="write the sample city as COPY-ready files")
    generate.add_argument("--scale", default=None, choices=("full", "small"))
    generate.add_argument("--out", type=Path)
    load = commands.add_parser("load", help="generate (once) and load the sample city")
    load.add_argument("--scale", default=None, choices=("full", "small"))
    load.add_argument("--force", action="store_true", help="reload even if already loaded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    scale = args.scale or settings.sample_scale
    try:
        if args.action == "generate":
            from data_samples.generate import generate as write_sample

            write_sample(args.out or settings.samples_dir / scale, scale)
        else:
            from data_samples.load import ensure_generated, load_sample
            from twin.core.db import sync_engine

            sample_dir = ensure_generated(settings.samples_dir, scale)
            load_sample(sync_engine(settings), sample_dir, force=args.force)
    except TwinError as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
