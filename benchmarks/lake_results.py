#!/usr/bin/env python
"""Big results inline through RabbitMQ vs through the data lake: 200 results of 5 MB each.

Two ``mqexec worker --concurrency 1`` processes (started as in ``benchmarks/coffea_runner.py``) on a private
vhost of the loopback RabbitMQ, created for the run and deleted afterwards, so that ``rabbitmqctl
list_connections vhost recv_oct send_oct`` counts exactly the bytes of this benchmark's connections (client
and workers). For each mode one timed ``client.map`` of 200 calls, each returning 5 MB of random bytes,
and ``client.gather`` of all of them (so the lake mode also reads its 1 GB back):

- **inline**: no ``lake_url``: every result travels in a result message;
- **lake**: ``lake_url`` set: results above 1 MiB are written to the lake by the worker, the message carries
  ``{url, size, sha256}``, and the client reads the bytes from the lake.

    python benchmarks/lake_results.py                                # lake in a fresh local folder
    python benchmarks/lake_results.py --lake root://host:1094//data/lake --n 200 --mb 5
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (str(REPO), str(REPO / "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import coffea_runner  # noqa: E402 - its worker start-up and queue clean-up


def random_bytes(i: int, size: int) -> bytes:
    """One task: ``size`` random (incompressible) bytes."""
    return os.urandom(size)


def _rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True).stdout


def _broker_bytes(vhost: str) -> int:
    """Bytes received + sent by the broker on the connections of ``vhost`` (open ones)."""
    total = 0
    for line in _rabbitmqctl("list_connections", "vhost", "recv_oct", "send_oct").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and parts[0] == vhost and parts[1].isdigit():
            total += int(parts[1]) + int(parts[2])
    return total


def _run(n: int, size: int) -> tuple[float, int, int]:
    """(wall seconds, bytes through the broker, results checked) for one mode, on the workers of the context."""
    with coffea_runner._mqexec_workers() as executor:
        client = executor.client
        assert client is not None
        vhost = coffea_runner.BROKER.rsplit("/", 1)[1]
        time.sleep(1.0)  # connections settle; counters are read before and after the timed part
        before = _broker_bytes(vhost)
        t0 = time.perf_counter()
        futures = client.map(random_bytes, range(n), [size] * n, pure=False)
        results = client.gather(futures)
        wall = time.perf_counter() - t0
        after = _broker_bytes(vhost)
        ok = sum(len(r) == size for r in results)
    return wall, after - before, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of results (default 200)")
    parser.add_argument("--mb", type=float, default=5.0, help="size of each result in MB (default 5)")
    parser.add_argument("--lake", help="lake URL (default: a fresh folder in $TMPDIR, removed afterwards)")
    args = parser.parse_args(argv)
    size = int(args.mb * 1_000_000)
    vhost = f"mqexec-bench-{secrets.token_hex(4)}"
    work = Path(tempfile.mkdtemp(prefix="mqexec-lake-bench-"))
    lake = args.lake or f"file://{work}/lake"
    _rabbitmqctl("add_vhost", vhost)
    rows = []
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        coffea_runner.BROKER = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
        for mode, url in (("inline through RabbitMQ", ""), (f"through the lake ({lake.split(':')[0]}://)", lake)):
            os.environ["MQEXEC_LAKE_URL"] = url  # read by the client's Config (and the workers')
            wall, through_broker, ok = _run(args.n, size)
            rows.append((mode, wall, through_broker, ok))
    finally:
        os.environ.pop("MQEXEC_LAKE_URL", None)
        _rabbitmqctl("delete_vhost", vhost)
        if not args.lake:
            shutil.rmtree(work, ignore_errors=True)
    payload = args.n * size
    print(f"{args.n} results of {args.mb:g} MB ({payload / 1e9:.2f} GB), 2 workers, RabbitMQ on loopback\n")
    print("| path | wall time [s] | MB/s | through the broker [MB] | vs payload | results intact |")
    print("|---|---:|---:|---:|---:|---|")
    for mode, wall, through, ok in rows:
        print(
            f"| {mode} | {wall:.2f} | {payload / 1e6 / wall:.0f} | {through / 1e6:.1f} | {through / payload:.3f}x | "
            f"{ok}/{args.n} |"
        )
    return 0 if all(r[3] == args.n for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
