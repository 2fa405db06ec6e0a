"""Command line: write a synthetic AGC fileset and print it as JSON.

``PYTHONPATH=tools python -m synthetic /tmp/agc --files 8 --events 125000 [--seed 0] [--processes ttbar wjets]``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .files import make_fileset
from .model import PROCESSES


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, write (or reuse) the files, print the fileset; ``main(["/tmp/agc", "--files", "1"])``."""
    parser = argparse.ArgumentParser(prog="python -m synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="directory for the ROOT files (created if missing)")
    parser.add_argument("--files", type=int, default=8, help="files per process (default: 8)")
    parser.add_argument("--events", type=int, default=125_000, help="events per file (default: 125000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes", nargs="+", default=["ttbar", "wjets", "single_top_t_chan"], choices=sorted(PROCESSES)
    )
    parser.add_argument("--output", help="also write the fileset JSON to this file")
    args = parser.parse_args(argv)
    fileset = make_fileset(
        args.outdir, n_files=args.files, events_per_file=args.events, processes=args.processes, seed=args.seed
    )
    text = json.dumps(fileset, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
