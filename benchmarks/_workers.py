"""``mqexec worker`` processes for a benchmark: own queue prefix and key, logs in a temporary folder, a client
of them; workers stopped and the prefix's queues deleted afterwards.

    with mqexec_workers(BROKER, 2) as client:
        client.map(...)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@contextlib.contextmanager
def mqexec_workers(broker: str, n: int, **settings: object) -> Iterator[object]:
    """``n`` ``mqexec worker --concurrency 1`` processes and a ready :class:`mqexec.Client` of them
    (``settings``: more :class:`~mqexec.config.Config` fields for the client)."""
    import mqexec
    from mqexec.keys import Identity

    prefix, identity = f"bench{uuid.uuid4().hex[:8]}", Identity.new()
    logs = Path(tempfile.mkdtemp(prefix="mqexec-bench-"))
    env = {
        **os.environ,
        "MQEXEC_QUEUE_PREFIX": prefix,
        "MQEXEC_SECRET": identity.trust.token(),
        "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    procs = []
    try:
        for i in range(n):
            argv = ["worker", "--broker", broker, "--concurrency", "1", "--hostname", f"w{i}-{prefix}@bench"]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mqexec", *argv, "--loglevel", "WARNING"],
                    env={**env, "MQEXEC_CACHE_DIR": str(logs / f"cache{i}")},
                    stdout=(logs / f"worker{i}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        with mqexec.Client(broker, identity=identity.text(), queue_prefix=prefix, **settings) as client:
            try:
                client.wait_for_workers(n, timeout=60)
            except TimeoutError as exc:
                raise RuntimeError(f"{exc} (worker logs in {logs})") from None
            yield client
    finally:
        _stop(procs)
        _delete_queues(broker, prefix)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _delete_queues(broker: str, prefix: str) -> None:
    from kombu import Connection

    from mqexec.config import Config
    from mqexec.topology import delete_topology

    with Connection(broker.replace("amqp://", "pyamqp://", 1), connect_timeout=5) as conn:
        delete_topology(conn.channel(), Config.load(broker_url=broker, queue_prefix=prefix))
