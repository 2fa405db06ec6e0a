#!/usr/bin/env python
"""Where a round trip goes: the median time, since ``submit``, at which a no-op task passes each stage.

    python benchmarks/roundtrip_stages.py [--roundtrips 400] [--broker amqp://guest:guest@127.0.0.1:5672//]

One ``mqexec worker --concurrency 1`` on RabbitMQ and a client, as in ``noop.py``; every process records a
monotonic timestamp (one clock for all processes of this machine) as it enters and leaves a few functions:

    client  submit → courier _send (sign, publish) ─▶ broker ─▶ worker main: gate (verify, lease note, ack,
    hand-off) ─▶ pool process: execute, publish result ─▶ broker ─▶ client: frame → result()

The timestamps come from wrappers that a ``sitecustomize`` module (written to a temporary folder put on the
workers' ``PYTHONPATH``) installs in each process, so the traced code is the installed mqexec, unchanged. A
wrapper costs about a microsecond; the round trip printed at the end is the traced one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

#: (module, class, method, stage name): the functions whose entry and exit are recorded
PROBES = [
    ("mqexec.client", "Client", "submit", "client: submit"),
    ("mqexec.courier", "Courier", "_send", "client: build, sign, publish the task"),
    ("mqexec.intake", "Gate", "on_message", "worker: gate (verify, lease note, ack, to the pool)"),
    ("mqexec.execute", "Executor", "__call__", "pool process: run the task"),
    ("mqexec.execute", "Executor", "publish", "pool process: publish the result (confirmed)"),
    ("mqexec.courier", "Courier", "_on_frame", "client: a frame (lease note, then result)"),
]

TRACER = """
import atexit, functools, importlib, os, threading, time
_events, _written, _lock = [], [0], threading.Lock()
def mark(name):
    _events.append((time.monotonic_ns(), name))
    if len(_events) - _written[0] > 100:  # pool processes end without atexit
        dump()
def dump():
    with _lock:  # the client's threads both record
        if not os.path.isdir(os.environ["MQEXEC_TRACE_DIR"]):  # the run is over
            return
        end = len(_events)
        with open(os.path.join(os.environ["MQEXEC_TRACE_DIR"], str(os.getpid())), "a") as f:
            f.writelines(f"{t} {n}\\n" for t, n in _events[_written[0]:end])
        _written[0] = end
def _wrap(cls, method, name):
    original = getattr(cls, method)
    @functools.wraps(original)
    def traced(*args, **kwargs):
        mark("> " + name)
        try:
            return original(*args, **kwargs)
        finally:
            mark("< " + name)
    setattr(cls, method, traced)
if os.environ.get("MQEXEC_TRACE_DIR"):
    for module, cls, method, name in PROBES:
        _wrap(getattr(importlib.import_module(module), cls), method, name)
    atexit.register(dump)
"""


def _install(folder: Path) -> None:
    (folder / "sitecustomize.py").write_text(f"PROBES = {PROBES!r}\n{TRACER}")


def _stages(trace_dir: Path, skip: int) -> tuple[list[tuple[str, float]], int]:
    """(stage, median ms since the round trip started) in order, and the number of round trips read."""
    events = []
    for f in trace_dir.iterdir():
        for line in f.read_text().splitlines():
            t, _, name = line.partition(" ")
            events.append((int(t), name))
    events.sort()
    starts = [i for i, (_, name) in enumerate(events) if name == "round trip"]
    times: dict[str, list[float]] = {}
    for a, b in zip(starts[skip:], starts[skip + 1 :], strict=False):
        t0, seen = events[a][0], {}
        for t, name in events[a + 1 : b]:
            while name in seen:  # a second frame, a second pass through the same function
                name += " (2nd)"
            seen[name] = (t - t0) / 1e6
        for name, ms in seen.items():
            times.setdefault(name, []).append(ms)
    rounds = len(starts[skip:]) - 1
    rows = [(n, statistics.median(v)) for n, v in times.items() if len(v) >= 0.9 * rounds]
    return sorted(rows, key=lambda r: r[1]), rounds


def noop(x):
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roundtrips", type=int, default=400)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mqexec-trace-") as tmp:
        site, trace_dir = Path(tmp, "site"), Path(tmp, "trace")
        site.mkdir()
        trace_dir.mkdir()
        _install(site)
        os.environ["MQEXEC_TRACE_DIR"] = str(trace_dir)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
        spec = importlib.util.spec_from_file_location("_mqexec_trace", site / "sitecustomize.py")
        assert spec is not None and spec.loader is not None
        tracer = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tracer)  # this process's probes (the workers import it at start-up)
        from _workers import mqexec_workers

        with mqexec_workers(args.broker, 1) as client:
            client.gather(client.map(noop, range(50), pure=False))
            latencies = []
            for i in range(args.roundtrips):
                t0 = time.perf_counter()
                tracer.mark("round trip")
                client.submit(noop, i, pure=False).result()
                latencies.append(time.perf_counter() - t0)
            tracer.mark("round trip")
        tracer.dump()
        rows, rounds = _stages(trace_dir, skip=20)
    print(f"{rounds} traced round trips, median round trip {statistics.median(latencies[20:]) * 1e3:.2f} ms")
    print(f"{'ms since submit':>15}  stage (> enters, < leaves)")
    for name, ms in rows:
        print(f"{ms:15.3f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
