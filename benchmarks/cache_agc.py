#!/usr/bin/env python
"""Chunk cache benchmark: the AGC ttbar analysis without a cache, then cold and warm with MQExecutor(cache=...).

Same fileset, same workers and the same ``Runner`` settings as ``benchmarks/coffea_runner.py`` (whose worker
start-up and fileset this script reuses); after an untimed warm-up run (the workers import coffea), three
timed ``Runner`` calls, each in a new Runner (no in-memory metadata), from submitting the fileset to the
merged output:

- **no cache**: ``MQExecutor()``;
- **cold**: ``MQExecutor(cache=URL)`` on an empty cache: every chunk runs and the workers write its record;
- **warm**: the same again: the client lists the cache and reads every record, nothing runs.

"chunks run" is counted on the workers (the processor appends a line per chunk to a file), not from
lookups. Every output is compared with the no-cache run (nevents exactly, histograms with ``np.allclose``).

    python benchmarks/cache_agc.py                                   # cache in a fresh local folder
    python benchmarks/cache_agc.py --cache root://host:1094//data/agc-cache
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
from coffea import processor  # noqa: E402
from coffea.nanoevents import NanoAODSchema  # noqa: E402
from coffea_runner import _load_example, _mqexec_workers, _warm_page_cache  # noqa: E402

agc = _load_example()
agc._ship_processor_by_value()


_TtbarAnalysis: Any = agc.TtbarAnalysis


class CountingTtbar(_TtbarAnalysis):
    """The AGC processor; appends a line to ``log`` for every chunk it processes (on the worker)."""

    def __init__(self, log: str) -> None:
        super().__init__()
        self.log = log

    def process(self, events):
        out = super().process(events)
        with open(self.log, "a") as f:
            f.write(f"{events.metadata['filename']} {events.metadata['entrystart']}\n")
        return out


def _same(out: dict, ref: dict) -> bool:
    if out["nevents"] != ref["nevents"] or set(out["hist_dict"]) != set(ref["hist_dict"]):
        return False
    return all(
        np.allclose(out["hist_dict"][r].values(flow=True), ref["hist_dict"][r].values(flow=True))
        and np.allclose(out["hist_dict"][r].variances(flow=True), ref["hist_dict"][r].variances(flow=True))
        for r in ref["hist_dict"]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="files per process (3 processes; default 8)")
    parser.add_argument("--events", type=int, default=125_000, help="events per file (default 125000)")
    parser.add_argument("--chunksize", type=int, default=100_000)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mqexec-agc-bench"))
    parser.add_argument("--cache", help="cache URL (default: a fresh folder in $TMPDIR, removed afterwards)")
    args = parser.parse_args(argv)

    fileset = agc.build_fileset(args.data_dir, args.files, args.events)
    _warm_page_cache(fileset)
    n_events = sum(spec["metadata"]["nevts"] for spec in fileset.values())
    work = Path(tempfile.mkdtemp(prefix="mqexec-cache-bench-"))
    cache = args.cache or f"file://{work}/cache"
    log = work / "chunks.log"
    rows = []
    with _mqexec_workers() as executor:
        reference = None
        warm_up = processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=args.chunksize, maxchunks=2)
        warm_up(fileset, processor_instance=agc.TtbarAnalysis(), treename="Events")  # workers import coffea
        for name, ex in (
            ("no cache", executor),
            ("cache, cold (empty)", executor.copy(cache=cache)),
            ("cache, warm (rerun)", executor.copy(cache=cache)),
        ):
            runner = processor.Runner(executor=ex, schema=NanoAODSchema, chunksize=args.chunksize, metadata_cache={})
            before = len(log.read_text().splitlines()) if log.exists() else 0
            t0 = time.perf_counter()
            out = runner(fileset, processor_instance=CountingTtbar(str(log)), treename="Events")
            wall = time.perf_counter() - t0
            ran = len(log.read_text().splitlines()) - before
            reference = reference or out
            rows.append((name, wall, ran, _same(out, reference)))
    chunks = rows[0][2]
    print(f"AGC ttbar, {n_events:,} events, {chunks} chunks of {args.chunksize:,}, 2 workers; cache: {cache}\n")
    print("| run | wall time [s] | chunks run on workers | chunks from the cache | vs no cache | same output |")
    print("|---|---:|---:|---:|---:|---|")
    for name, wall, ran, same in rows:
        print(
            f"| {name} | {wall:.2f} | {ran} | {chunks - ran} | {wall / rows[0][1]:.2f}x | {'yes' if same else 'NO'} |"
        )
    if not args.cache:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
