"""Issue 9, case 9: broker failover. A coffea run on a 3-node RabbitMQ cluster (quorum queues replicated on all
three); client and workers know all three URLs; the node leading the task queue is killed with ``kill -9`` in the
middle of the run. The histogram must be IterativeExecutor's, every chunk counted once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from rabbit import Cluster, fixture_rabbit_cluster  # noqa: F401 - the rabbit_cluster fixture
from reliability_log import record
from test_coffea import SlowTtbar, _run, assert_same, fileset, reference  # noqa: F401 - fixtures
from workerproc import Worker

import mqexec
from mqexec.topology import task_queue_name


class _Arrivals:
    """The moments outcomes arrive at a client (polled every 20 ms from its statistics)."""

    def __init__(self, client: mqexec.Client) -> None:
        self.client = client
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        seen = 0
        while not self._stop.wait(0.02):
            now = sum(self.client.stats()["by_worker"].values())
            self.times += [time.monotonic()] * (now - seen)
            seen = now

    def first_after(self, moment: float) -> float | None:
        return next((t for t in self.times if t > moment), None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.timeout(240)
def test_kill9_of_the_task_queue_leader_mid_coffea_run(
    rabbit_cluster: Cluster,
    fileset: dict[str, Any],  # noqa: F811
    reference: tuple[dict[str, Any], dict[str, Any]],  # noqa: F811
    settings: dict[str, Any],
    start_worker: Callable[..., Worker],
) -> None:
    from mqexec import MQExecutor

    url = rabbit_cluster.failover_url()
    workers = [start_worker("--concurrency", "1", broker=url) for _ in range(2)]
    killed: dict[str, Any] = {}
    with mqexec.Client(url, **settings) as client:
        arrivals = _Arrivals(client)
        queue = task_queue_name(client.config)

        def kill_the_leader() -> None:
            deadline = time.monotonic() + 120
            while len(arrivals.times) < 6 + 3:  # the 6 files' metadata, then 3 chunks
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
            leader = rabbit_cluster.leader_of(queue)
            killed["at"], killed["node"] = time.monotonic(), leader.name
            leader.kill9()

        killer = threading.Thread(target=kill_the_leader, daemon=True)
        killer.start()
        result = _run(fileset, MQExecutor(client=client, status=False), processor=SlowTtbar(1.0))
        killer.join(10)
        arrivals.stop()
        stats = client.stats()["counts"]
    assert "at" in killed, "the leader was not killed during the run"
    assert_same(result, reference)  # every chunk once: the same histogram, entries and chunk count
    next_result = arrivals.first_after(killed["at"])
    assert next_result is not None
    to_next = next_result - killed["at"]
    print(
        f"\nfailover: killed {killed['node']}; next result {to_next:.1f} s later; {stats}; workers alive "
        f"{[w.proc.poll() is None for w in workers]}"
    )
    assert all(w.proc.poll() is None for w in workers), [
        (w.proc.returncode, w.text()[-4000:]) for w in workers if w.proc.poll() is not None
    ]
    record(
        "9",
        "`kill -9` of the node leading the task queue (3-node cluster, quorum queues) mid coffea run",
        "the histogram identical to IterativeExecutor's",
        recover_s=to_next,
        lost=0,
        twice=stats.get("duplicates", 0),
        resent=stats.get("resent", 0),
    )
