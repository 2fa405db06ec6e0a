#!/usr/bin/env python
"""Dask-graph benchmark: one dask-awkward histogramming graph over synthetic NanoAOD, three schedulers.

The graph (coffea ``NanoEventsFactory(mode="dask")`` + ``hist.dask``): per partition, jets with pT > 30 GeV
and |eta| < 2.4, then an HT histogram, a jet-multiplicity histogram, a leading-jet pT histogram and the event
count, all tree-reduced by dask. It is computed with

* ``scheduler="processes"`` (dask's multiprocessing pool, 2 processes),
* ``distributed.Client(LocalCluster(n_workers=2, threads_per_worker=1))``,
* mqexec: ``scheduler=client.get`` with 2 ``mqexec worker --concurrency 1`` processes this script starts on
  RabbitMQ (amqp://guest:guest@127.0.0.1:5672//, a fresh key; ``benchmarks/_workers.py``).

Each scheduler computes the graph once untimed (workers import coffea, files get into the page cache), then
``--repeat`` timed times; the best is reported. Outputs are checked against ``scheduler="sync"``.

    python benchmarks/dask_graph.py                      # 4 files x 100k events, 16 partitions
    python benchmarks/dask_graph.py --files 8 --events 100000 --step 25000 --repeat 3

"messages" counts what crossed a broker or scheduler per computation: for mqexec the task messages it
published plus as many result messages (``mqexec.adapters.dask.STATS``); for distributed, the dask tasks
the scheduler ran (each is at least one scheduler→worker and one worker→scheduler message).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without mqexec installed
    sys.path.insert(0, str(REPO))

import dask  # noqa: E402
from _plot import save_bar_chart  # noqa: E402

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
WORKERS = 2


def build_graph(paths: list[Path], events: int, step: int):
    """The dask-awkward outputs (three histograms and the event count) over the files."""
    import dask_awkward as dak
    import hist.dask as hda
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    NanoAODSchema.warn_missing_crossrefs = False
    spec = {
        str(p): {"object_path": "Events", "steps": [[s, min(s + step, events)] for s in range(0, events, step)]}
        for p in paths
    }
    ev = NanoEventsFactory.from_root(spec, schemaclass=NanoAODSchema, mode="dask").events()
    jets = ev.Jet[(ev.Jet.pt > 30) & (abs(ev.Jet.eta) < 2.4)]
    ht = hda.Hist.new.Reg(50, 0, 1500, name="ht").Weight().fill(ht=dak.sum(jets.pt, axis=1), weight=ev.genWeight)
    njet = hda.Hist.new.Reg(12, 0, 12, name="n").Double().fill(n=dak.num(jets, axis=1))
    lead = jets[dak.num(jets, axis=1) > 0]
    pt1 = hda.Hist.new.Reg(50, 0, 500, name="pt").Double().fill(pt=lead.pt[:, 0])
    return ht, njet, pt1, dak.num(ev, axis=0), ev.npartitions


def timed(compute, repeat: int) -> tuple[float, object]:
    compute()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = compute()
        best = min(best, time.perf_counter() - t)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--events", type=int, default=100_000, help="events per file")
    ap.add_argument("--step", type=int, default=25_000, help="events per partition")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mqexec-dask-bench"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO / "tools"))  # the synthetic-data generator is repository tooling
    from synthetic import write_nanoaod

    dask.config.set({"awkward.optimization.which": ["columns"]})  # see docs/benchmarks.md, "dask graph"
    data = Path(args.data_dir)
    processes = ["ttbar", "wjets", "single_top_t_chan"]
    paths = [
        write_nanoaod(data / f"f{i}.root", args.events, seed=i, process=processes[i % 3]) for i in range(args.files)
    ]
    *outputs, npart = build_graph(paths, args.events, args.step)
    expected = dask.compute(*outputs, scheduler="sync")
    rows = []

    def check(out) -> str:
        return "yes" if all(a == b for a, b in zip(out, expected, strict=True)) else "NO"

    # dask's multiprocessing scheduler
    wall, out = timed(lambda: dask.compute(*outputs, scheduler="processes", num_workers=WORKERS), args.repeat)
    rows.append(('dask `scheduler="processes"` (2 processes)', wall, "-", check(out)))

    # distributed
    import distributed

    with (
        distributed.LocalCluster(
            n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        wall, out = timed(lambda: dask.compute(*outputs, scheduler=client.get), args.repeat)
        rows.append(("distributed, LocalCluster(2 workers x 1 thread)", wall, "{dask_tasks} tasks", check(out)))

    # mqexec
    from _workers import mqexec_workers

    from mqexec.adapters.dask import STATS

    with mqexec_workers(BROKER, WORKERS) as client:
        wall, out = timed(lambda: dask.compute(*outputs, scheduler=client.get), args.repeat)
        STATS.clear()
        dask.compute(*outputs, scheduler=client.get)
        msgs = f"{2 * STATS['tasks']} ({STATS['tasks']} tasks + results; {STATS['dask_tasks']} dask tasks)"
        rows.append(("mqexec, 2 workers x 1 process (RabbitMQ)", wall, msgs, check(out)))

    n_events = args.files * args.events
    print(
        f"\n{args.files} files x {args.events} events = {n_events} events, {npart} partitions; "
        f"best of {args.repeat}; Python {platform.python_version()}, dask {dask.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n"
    )
    ref = rows[1][1]
    print("| scheduler | wall time [s] | vs distributed | messages per compute | same output |")
    print("|---|---:|---:|---|---|")
    for name, wall, msgs, same in rows:
        msgs = msgs.format(dask_tasks=STATS["dask_tasks"])  # the same graph mqexec was handed
        print(f"| {name} | {wall:.2f} | {wall / ref:.2f}x | {msgs} | {same} |")
    print(save_bar_chart({r[0]: n_events / r[1] for r in rows}, "dask_graph", "dask-awkward graph", unit="events/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
