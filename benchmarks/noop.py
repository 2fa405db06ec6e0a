"""No-op tasks: throughput of ``Client.map`` and of a ``submit`` loop over 10,000 calls, and single-task round
trip, mqexec vs Dask.

    python benchmarks/noop.py [--tasks 10000] [--roundtrips 300] [--broker amqp://guest:guest@127.0.0.1:5672//]

One run, same machine: mqexec with 2 local ``mqexec worker`` processes (concurrency 1 each) on loopback
RabbitMQ, mqexec's embedded default (``Client()``: file-system broker), and ``distributed.Client`` on
``LocalCluster(n_workers=2, threads_per_worker=1)``. Prints a table
and the ratios (mqexec / dask for tasks/s; dask / mqexec for latency, so > 1 means mqexec is better).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _plot import save_bar_chart
from _workers import mqexec_workers


def noop(x):
    return x


def measure(client, tasks: int, roundtrips: int, loop: bool = False, **map_kw) -> dict[str, float]:
    """``map`` + ``gather`` (or, ``loop``: ``[client.submit(noop, x) for x in xs]`` + ``gather``), then round trips."""
    client.gather(client.map(noop, range(50), pure=False, **map_kw))  # warm up: workers, imports, caches
    started = time.perf_counter()
    if loop:
        futures = [client.submit(noop, x, pure=False) for x in range(tasks)]
    else:
        futures = client.map(noop, range(tasks), pure=False, **map_kw)
    results = client.gather(futures)
    elapsed = time.perf_counter() - started
    assert results == list(range(tasks))
    latencies = []
    for i in range(roundtrips):
        t0 = time.perf_counter()
        client.submit(noop, i, pure=False).result()
        latencies.append(time.perf_counter() - t0)
    q = statistics.quantiles(latencies, n=10)
    return {"tasks_per_s": tasks / elapsed, "p50_ms": statistics.median(latencies) * 1e3, "p90_ms": q[8] * 1e3}


def run_mqexec(broker: str, tasks: int, roundtrips: int) -> dict[str, dict[str, float]]:
    with mqexec_workers(broker, 2) as client:
        out = {"mqexec (batched map)": measure(client, tasks, roundtrips)}
        out["mqexec (batch_size=1)"] = measure(client, tasks, roundtrips, batch_size=1)
        out["mqexec (submit loop)"] = measure(client, tasks, roundtrips, loop=True)
        return out


def run_embedded(tasks: int, roundtrips: int) -> dict[str, dict[str, float]]:
    import mqexec

    os.environ.pop("MQEXEC_BROKER_URL", None)
    with mqexec.Client(concurrency=2) as client:
        return {"mqexec embedded default (1 worker x 2)": measure(client, tasks, roundtrips)}


def run_dask(tasks: int, roundtrips: int) -> dict[str, dict[str, float]]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        return {
            "distributed.Client, LocalCluster(2x1)": measure(client, tasks, roundtrips),
            "distributed.Client (submit loop)": measure(client, tasks, roundtrips, loop=True),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args(argv)
    rows = {
        **run_mqexec(args.broker, args.tasks, args.roundtrips),
        **run_embedded(args.tasks, args.roundtrips),
        **run_dask(args.tasks, args.roundtrips),
    }
    print(f"\n{args.tasks} no-op tasks through map+gather; {args.roundtrips} sequential submit().result()")
    print(f"{'path':42} {'tasks/s':>9} {'p50 ms':>8} {'p90 ms':>8}")
    for name, r in rows.items():
        print(f"{name:42} {r['tasks_per_s']:9.0f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f}")
    dask = rows["distributed.Client, LocalCluster(2x1)"]
    for name in ("mqexec (batched map)", "mqexec (batch_size=1)", "mqexec (submit loop)",
                 "mqexec embedded default (1 worker x 2)"):  # fmt: skip
        r = rows[name]
        dask = rows[
            "distributed.Client (submit loop)" if "submit loop" in name else "distributed.Client, LocalCluster(2x1)"
        ]
        print(
            f"{name}: throughput {r['tasks_per_s'] / dask['tasks_per_s']:.2f}x dask, "
            f"p50 latency {dask['p50_ms'] / r['p50_ms']:.2f}x better, p90 {dask['p90_ms'] / r['p90_ms']:.2f}x better"
        )
    print(
        save_bar_chart(
            {n: r["tasks_per_s"] for n, r in rows.items()}, "noop", "No-op tasks, map + gather", unit="tasks/s"
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
