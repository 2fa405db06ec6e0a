#!/usr/bin/env python
"""coffea Runner benchmark: the AGC CMS ttbar processor on synthetic NanoAOD, one executor after another.

Same machine, same fileset (written by ``tools/synthetic.py`` on first use and reused afterwards), same
chunksize; each executor in a fresh Python process of its own, one timed ``Runner`` call per repeat (wall time
from submitting the fileset to the merged output, excluding executor set-up such as starting a Dask cluster,
which is reported separately). Every executor's output is checked against FuturesExecutor's (same nevents,
same histograms).

    python benchmarks/coffea_runner.py                         # iterative, futures, dask, mqexec
    python benchmarks/coffea_runner.py --mqexec                # + MQExecutor, 2 mqexec workers on RabbitMQ
    python benchmarks/coffea_runner.py --executors futures mqexec mqexec-merge mqexec-embedded
    python benchmarks/coffea_runner.py --files 8 --events 125000 --chunksize 100000 --executors futures dask

Adding an executor is one entry in :data:`EXECUTORS`: a name and a context manager that yields a coffea
executor (and cleans up after it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without mqexec installed
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from _plot import save_bar_chart  # noqa: E402
from coffea import processor  # noqa: E402

WORKERS = 2


def _load_example():
    spec = importlib.util.spec_from_file_location("agc_ttbar", REPO / "docs" / "examples" / "agc_ttbar.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["agc_ttbar"] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ executors, a table
@contextlib.contextmanager
def iterative():
    yield processor.IterativeExecutor(status=False)


@contextlib.contextmanager
def futures():
    yield processor.FuturesExecutor(workers=WORKERS, status=False)


@contextlib.contextmanager
def dask():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=WORKERS, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        yield processor.DaskExecutor(client=client, status=False)


BROKER = os.environ.get("MQEXEC_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//")


@contextlib.contextmanager
def _mqexec_workers(**executor_kw):
    """An MQExecutor on ``WORKERS`` ``mqexec worker --concurrency 1`` processes on the broker."""
    from _workers import mqexec_workers

    from mqexec import MQExecutor

    with mqexec_workers(BROKER, WORKERS) as client:
        yield MQExecutor(client=client, status=False, **executor_kw)


@contextlib.contextmanager
def mqexec():
    with _mqexec_workers() as executor:
        yield executor


@contextlib.contextmanager
def mqexec_merge():
    with _mqexec_workers(merging=4) as executor:
        yield executor


@contextlib.contextmanager
def mqexec_embedded():
    from mqexec import MQExecutor

    with MQExecutor(status=False) as executor:
        yield executor


#: name -> (label, context manager yielding the executor). Add an executor here.
EXECUTORS = {
    "iterative": ("IterativeExecutor", iterative),
    "futures": (f"FuturesExecutor(workers={WORKERS})", futures),
    "dask": (f"DaskExecutor, LocalCluster({WORKERS}x1 thread)", dask),
    "mqexec": (f"MQExecutor, RabbitMQ + {WORKERS} mqexec workers (-c 1)", mqexec),
    "mqexec-merge": (f"MQExecutor(merging=4), RabbitMQ + {WORKERS} mqexec workers (-c 1)", mqexec_merge),
    "mqexec-embedded": ("MQExecutor() embedded default (1 local worker, -c 2)", mqexec_embedded),
}
REFERENCE = "futures"


# ------------------------------------------------------------------------------------------------ running
def _same_output(a: dict, b: dict) -> bool:
    if a["nevents"] != b["nevents"] or set(a["hist_dict"]) != set(b["hist_dict"]):
        return False
    for region, ha in a["hist_dict"].items():
        hb = b["hist_dict"][region]
        if sorted(ha.axes["process"]) != sorted(hb.axes["process"]):
            return False
        if sorted(ha.axes["variation"]) != sorted(hb.axes["variation"]):
            return False
        for p in ha.axes["process"]:
            for v in ha.axes["variation"]:
                va, vb = ha[:, p, v].view(flow=True), hb[:, p, v].view(flow=True)
                if not (np.allclose(va["value"], vb["value"]) and np.allclose(va["variance"], vb["variance"])):
                    return False
    return True


def _warm_page_cache(fileset: dict) -> None:
    """Read every file once so no executor pays for the first disk read."""
    for spec in fileset.values():
        for path in spec["files"]:
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def _measure(name, fileset, chunksize, repeat):
    """Best of ``repeat`` runs of one executor: (row, output). Runs in a fresh interpreter of its own (see run)."""
    agc = _load_example()
    label, factory = EXECUTORS[name]
    best, output = None, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        try:
            with factory() as executor:
                setup = time.perf_counter() - t0
                out, metrics, wall = agc.run_analysis(fileset, executor, chunksize=chunksize)
        except Exception as exc:  # keep going: one broken executor should not hide the others' numbers
            print(f"{label}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
            return {"name": name, "label": label, "failed": f"{type(exc).__name__}: {exc}"}, None
        n_events = sum(out["nevents"].values())
        print(
            f"{label}: {n_events:,} events, {metrics.get('chunks')} chunks, {wall:.2f} s "
            f"({n_events / wall:,.0f} events/s), set-up {setup:.2f} s",
            file=sys.stderr,
        )
        if best is None or wall < best["wall"]:
            output = out
            best = {
                "name": name,
                "label": label,
                "setup": setup,
                "wall": wall,
                "events": n_events,
                "rate": n_events / wall,
                "chunks": metrics.get("chunks"),
            }
    return best, output


def _measure_into(pipe, *args):
    pipe.send(_measure(*args))
    pipe.close()


def run(names, fileset, chunksize, repeat=1):
    """Time each executor (best of ``repeat`` runs); returns table rows and the outputs by name.

    Each executor runs in a fresh interpreter: run one after another in one process, whichever ran second was
    ~20 % slower, whichever it was (a process grown by the first run forks and collects more slowly)."""
    import multiprocessing

    rows = []
    outputs = {}
    spawn = multiprocessing.get_context("spawn")
    for name in names:
        receive, send = spawn.Pipe(duplex=False)
        child = spawn.Process(target=_measure_into, args=(send, name, fileset, chunksize, repeat))
        child.start()  # not a Pool: its processes are daemons, which may not start the executors' own processes
        send.close()
        best, output = receive.recv()
        child.join()
        if output is not None:
            outputs[name] = output
        rows.append(best)
    reference = next((r for r in rows if r["name"] == REFERENCE and "failed" not in r), None)
    for row in rows:
        if "failed" in row:
            continue
        row["ratio"] = row["rate"] / reference["rate"] if reference else None
        row["same"] = _same_output(outputs[row["name"]], outputs[REFERENCE]) if reference else None
    return rows, outputs


def markdown_table(rows) -> str:
    lines = [
        "| executor | wall time [s] | events/s | throughput vs FuturesExecutor | set-up [s] | same output |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | failed | | | | {r['failed']} |")
            continue
        same = {True: "yes", False: "NO", None: "n/a"}[r["same"]]
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['label']} | {r['wall']:.2f} | {r['rate']:,.0f} | {ratio} | {r['setup']:.2f} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=8, help="files per process (3 processes; default 8)")
    parser.add_argument("--events", type=int, default=125_000, help="events per file (default 125000)")
    parser.add_argument("--chunksize", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mqexec-agc-bench"))
    parser.add_argument(
        "--executors", nargs="+", choices=sorted(EXECUTORS), default=["iterative", "futures", "dask", "mqexec"]
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per executor; the fastest is reported")
    parser.add_argument(
        "--mqexec",
        action="store_true",
        help=f"also run MQExecutor with {WORKERS} mqexec workers on RabbitMQ ($MQEXEC_BENCH_BROKER, "
        "default loopback guest)",
    )
    args = parser.parse_args(argv)

    names = list(dict.fromkeys(args.executors + (["mqexec"] if args.mqexec else [])))
    if any(n.startswith("mqexec") for n in names):
        try:
            from mqexec import MQExecutor  # noqa: F401
        except ImportError as exc:
            print(f"skipping MQExecutor: {exc}", file=sys.stderr)
            names = [n for n in names if not n.startswith("mqexec")]

    agc = _load_example()
    t0 = time.perf_counter()
    fileset = agc.build_fileset(args.data_dir, args.files, args.events, seed=args.seed)
    n_files = sum(len(spec["files"]) for spec in fileset.values())
    n_events = sum(spec["metadata"]["nevts"] for spec in fileset.values())
    size = sum(os.path.getsize(p) for spec in fileset.values() for p in spec["files"])
    print(
        f"fileset: {n_events:,} events in {n_files} files ({size / 1e9:.2f} GB), ready in "
        f"{time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    _warm_page_cache(fileset)

    load_before = os.getloadavg()[0]
    rows, _ = run(names, fileset, args.chunksize, args.repeat)
    print()
    print(
        f"AGC ttbar, synthetic NanoAOD: {n_events:,} events in {n_files} files ({size / 1e9:.2f} GB), "
        f"chunksize {args.chunksize:,}; {platform.node()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
        f"best of {args.repeat}"
    )
    print()
    print(markdown_table(rows))
    print(
        save_bar_chart(
            {r["label"]: r.get("rate") for r in rows}, "coffea_runner", "AGC ttbar, coffea Runner", unit="events/s"
        )
    )
    return 0 if all("failed" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
