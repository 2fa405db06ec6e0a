"""Issue 9, "never hang, never lose", cases 1-4 on a private RabbitMQ node with RabbitMQ 4's limits (a 5 s
``consumer_timeout``, a 16 MiB ``max_message_size``): a task longer than the consumer timeout, connection blips,
half-open connections, publishing while the broker is down — and what the other fault modules share (the node,
run logs, queue probes). Each test asserts the outcome and records what it measured (``reliability_log.py``).

    test_faults.py           1 consumer_timeout · 2 blips · 3 half-open · 4 broker down
    test_faults_results.py   5 results above the message limit · 6 a worker with the wrong identity
    test_faults_sessions.py  7 a killed client, a client away · 8 close() after a lost connection
    test_faults_cluster.py   9 failover on a 3-node cluster
    test_faults_connect.py   10 TLS · 11 bad URLs · a silent failover broker
"""

from __future__ import annotations

import datetime
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rabbit import PrivateNode, consumer_timeout, max_message_size
from reliability_log import record
from test_reliability import record_and_sleep
from workerproc import Worker

import mqexec

CONSUMER_TIMEOUT_MS = 5_000  # the broker closes a channel holding a delivery unacked this long (tick 1 s)
MB = 1_000_000
_NODE = pytest.StashKey[PrivateNode]()


# ------------------------------------------------------------------------------------------- what tasks do
def triple(x: int) -> int:
    return 3 * x


def big_result(n: int) -> bytes:
    """``n`` bytes of a pattern the client can check (not compressible to nothing, cheap to make)."""
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def stamp_and_sleep(log: str, i: int, delay: float) -> int:
    """Note ``<i> <wall-clock start>`` in ``log``, then sleep."""
    with open(log, "a") as fh:
        fh.write(f"{i} {time.time():.3f}\n")
    time.sleep(delay)
    return i


# -------------------------------------------------------------------------------------- what tests observe
def runs(log: Path) -> Counter[int]:
    """How often each task id was started (the tasks append ``<id> ...`` lines to ``log``)."""
    if not log.exists():
        return Counter()
    return Counter(int(line.split()[0]) for line in log.read_text().splitlines() if line.strip())


def stamps(log: Path) -> dict[int, list[float]]:
    """When each task id was started (``stamp_and_sleep``'s log), every time it was."""
    out: dict[int, list[float]] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        i, when = line.split()
        out.setdefault(int(i), []).append(float(when))
    return out


def wait_for(what: str, check: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """Poll ``check()`` until it is true; fail naming ``what`` after ``timeout`` s (a bound, never a measurement)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(step)
    return value


def logged_at(text: str, needle: str, since: float) -> float | None:
    """The wall-clock time of the first log line (``%(asctime)s`` format) after ``since`` that holds ``needle``."""
    for line in text.splitlines():
        if needle in line:
            try:
                when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if when >= since:
                return when
    return None


def messages_in(url: str, queue: str) -> int:
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        return int(conn.channel().queue_declare(queue=queue, passive=True)[1])


def queue_exists(url: str, queue: str) -> bool:
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        try:
            conn.channel().queue_declare(queue=queue, passive=True)
        except NotFound:
            return False
    return True


def queues(node: PrivateNode) -> list[str]:
    return node.ctl("-q", "list_queues", "name").split()


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(name="node")
def fixture_node(request: pytest.FixtureRequest) -> PrivateNode:
    """The session's fault node: ``consumer_timeout`` 5 s (tick 1 s), ``max_message_size`` 16 MiB; started on first
    use (in any fault module), restarted if a test stopped it, removed at the end of the session."""
    stash = request.session.stash
    if _NODE not in stash:
        stash[_NODE] = PrivateNode(consumer_timeout(CONSUMER_TIMEOUT_MS) + max_message_size()).start()
        request.session.addfinalizer(stash[_NODE].remove)
    if not stash[_NODE].running:
        stash[_NODE].start()
    return stash[_NODE]


@pytest.fixture(name="on_node")
def fixture_on_node(node: PrivateNode, settings: dict[str, object]) -> dict[str, Any]:
    """Client settings for the fault node (heartbeat 2 s); its workers are started with ``broker=node.url()``."""
    return {**settings, "heartbeat": 2.0}


# ------------------------------------------------------------------------------------ 1. consumer_timeout
def test_task_longer_than_consumer_timeout_runs_once_and_no_worker_dies(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    workers = [start_worker("--concurrency", "1", broker=node.url()) for _ in range(2)]
    with mqexec.Client(node.url(), **on_node) as client:
        started = time.monotonic()
        long = client.submit(record_and_sleep, str(log), 1, 3 * CONSUMER_TIMEOUT_MS / 1000)
        assert long.result(timeout=120) == 10
        took = time.monotonic() - started
        later = client.map(record_and_sleep, [str(log)] * 20, range(100, 120), [0.0] * 20)
        assert client.gather(later, errors="raise") == [i * 10 for i in range(100, 120)]
    counts = runs(log)
    assert counts[1] == 1, counts
    assert all(w.proc.poll() is None for w in workers), [w.text()[-2000:] for w in workers]
    assert not any("PRECONDITION_FAILED" in w.text() for w in workers)
    record(
        "1",
        f"a task 3x longer than the broker's consumer_timeout ({CONSUMER_TIMEOUT_MS / 1000:g} s)",
        "the result, once; later work runs",
        recover_s=None,
        lost=0,
        twice=counts[1] - 1,
        task_s=round(took, 1),
    )


# ----------------------------------------------------------------------------------------------- 2. blips
def test_five_connection_blips_during_one_task(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    log = tmp_path / "runs"
    workers = [start_worker("--concurrency", "1", broker=node.url()) for _ in range(2)]
    with mqexec.Client(node.url(), **on_node) as client:
        task = client.submit(record_and_sleep, str(log), 1, 20.0)
        wait_for("the task started", lambda: runs(log)[1], 60)
        for i in range(5):
            time.sleep(3.0)
            node.close_all_connections(f"fault test blip {i + 1}")
            if i == 1:  # the busy worker, reconnected, takes no second task: the idle one runs it at once
                quick = client.submit(record_and_sleep, str(log), 2, 0.0)
        blipped = time.monotonic()
        assert quick.result(timeout=60) == 20
        assert task.result(timeout=120) == 10
        after = time.monotonic() - blipped
        more = client.map(record_and_sleep, [str(log)] * 10, range(100, 110), [0.0] * 10)
        assert client.gather(more) == [i * 10 for i in range(100, 110)]
        stats = client.stats()["counts"]
    counts = runs(log)
    print(f"\nblips: runs {counts[1]}, client counts {stats}, result {after:.1f} s after the last blip")
    assert counts[1] == 1, (counts, stats)
    assert all(w.proc.poll() is None for w in workers)
    assert stats.get("dead", 0) == 0
    record(
        "2",
        "five `rabbitmqctl close_all_connections` during one 20 s task",
        "the result (a warning per blip in the logs)",
        recover_s=None,
        lost=0,
        twice=counts[1] - 1,
        resent=stats.get("resent", 0),
    )


def test_blips_between_short_tasks_lose_none_that_celery_dropped(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """Short tasks: the worker holds one task waiting per process. Celery drops such a task when the connection
    goes (``Consumer.on_close``: "they will be redelivered"), but it was acknowledged when taken: the worker gives
    it back to its client after reconnecting. Before, its lease was renewed for ever and the run hung."""
    log, n = tmp_path / "runs", 300
    start_worker("--concurrency", "1", broker=node.url())
    with mqexec.Client(node.url(), **on_node) as client:
        futures = client.map(record_and_sleep, [str(log)] * n, range(n), [0.03] * n, batch_size=1)
        for i, done in enumerate((30, 100, 170)):
            wait_for(f"{done} results", lambda done=done: sum(f.done() for f in futures) >= done, 120)
            node.close_all_connections(f"fault test: blip {i + 1} between short tasks")
        results = [f.result(timeout=120) for f in futures]  # a dropped task hung here for ever
        stats = client.stats()["counts"]
    print(f"\nblips between short tasks: client counts {stats}")
    assert results == [i * 10 for i in range(n)]
    assert set(runs(log)) == set(range(n))
    assert stats.get("dead", 0) == 0


def test_a_dead_lettered_task_states_how_often_it_was_delivered(node: PrivateNode, on_node: dict[str, Any]) -> None:
    """A message that consumers keep handing back is dead-lettered by the broker; the future's error says how
    often it was really delivered (RabbitMQ's x-death count counts dead-letterings, always 1 here)."""
    from kombu import Connection

    from mqexec.topology import BROKER_DELIVERY_LIMIT, task_queue

    with mqexec.Client(node.url(), **on_node) as client:
        fut = client.submit(record_and_sleep, "/dev/null", 1, 0.0)
        deliveries = 0
        with Connection(node.url(), connect_timeout=5) as conn:
            channel = conn.channel()
            queue = task_queue(client.config)(channel)
            queue.declare()  # as the client does (it may not have sent the task yet)
            deadline = time.monotonic() + 30
            while not fut.done() and time.monotonic() < deadline:
                message = channel.basic_get(queue.name)
                if message is None:
                    time.sleep(0.02)
                    continue
                deliveries += 1
                channel.basic_reject(message.delivery_tag, requeue=True)
        with pytest.raises(mqexec.TaskDeadLettered) as dead:
            fut.result(timeout=30)
    assert deliveries == BROKER_DELIVERY_LIMIT + 1
    assert f"delivered it more than {BROKER_DELIVERY_LIMIT} times" in str(dead.value)


# ------------------------------------------------------------------------------------------ 3. half-open
def test_half_open_connections_are_noticed_and_nothing_is_lost(
    node: PrivateNode,
    on_node: dict[str, Any],
    start_worker: Callable[..., Worker],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from halfopen import HalfOpenRelay

    log = tmp_path / "runs"
    n = 400
    with HalfOpenRelay("127.0.0.1", node.amqp_port) as relay:
        url = relay.url(node.url())
        env = {"MQEXEC_HEARTBEAT": "2"}
        workers = [start_worker("--concurrency", "1", broker=url, env=env) for _ in range(2)]
        caplog.set_level(logging.WARNING, logger="mqexec.client")
        with mqexec.Client(url, **on_node) as client:
            futures = client.map(record_and_sleep, [str(log)] * n, range(n), [0.02] * n)
            wait_for("100 results", lambda: sum(f.done() for f in futures) >= 100, 120)
            frozen_wall, frozen = time.time(), time.monotonic()
            relay.freeze()
            submits = []
            for i in range(20):  # submit() never waits for the broker
                t = time.monotonic()
                futures.append(client.submit(record_and_sleep, str(log), n + i, 0.0))
                submits.append(time.monotonic() - t)
            before = sum(f.done() for f in futures)
            assert client.gather(futures) == [i * 10 for i in range(n + 20)]
            recovered = time.monotonic() - frozen
            stats = client.stats()["counts"]
    client_noticed = next((r.created for r in caplog.records if "lost the broker" in r.getMessage()), None)
    worker_noticed = [logged_at(w.text(), "Connection to broker lost", frozen_wall) for w in workers]
    counts = runs(log)
    twice = sum(c - 1 for c in counts.values())
    print(
        f"\nhalf-open: client noticed after {client_noticed and client_noticed - frozen_wall:.1f} s, workers "
        f"{[w and round(w - frozen_wall, 1) for w in worker_noticed]}; {before} done at freeze; all done "
        f"{recovered:.1f} s after; longest submit {max(submits) * 1000:.0f} ms; reruns {twice}; {stats}"
    )
    assert client_noticed is not None and client_noticed - frozen_wall < 3 * 2.0 + 2
    assert all(w is not None and w - frozen_wall < 3 * 2.0 + 2 for w in worker_noticed), worker_noticed
    assert max(submits) < 5.0  # bounded (it blocked 45 s and more); ~0.4 s on a quiet machine, 1.4 s at load 7
    assert set(counts) == set(range(n + 20))
    record(
        "3",
        "half-open connections (a relay freezes: no FIN, no RST), heartbeat 2 s",
        "all results; a warning per lost connection",
        recover_s=recovered,
        lost=0,
        twice=twice,
        client_noticed_s=round(client_noticed - frozen_wall, 1),
        workers_noticed_s=[round(w - frozen_wall, 1) for w in worker_noticed if w],
        longest_submit_ms=round(max(submits) * 1000),
    )


# ----------------------------------------------------------------------------------------- 4. broker down
def test_publishing_while_the_broker_is_down_fails_then_the_same_calls_run(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker]
) -> None:
    start_worker("--concurrency", "2", broker=node.url())
    with mqexec.Client(node.url(), **{**on_node, "publish_timeout": 3.0}) as client:
        assert client.submit(triple, 0).result(timeout=60) == 0
        node.stop()
        started = time.monotonic()
        one = client.submit(triple, 7)
        many = client.map(triple, range(100))
        with pytest.raises(mqexec.BrokerError, match=r"unreachable for \d+ s \(publish_timeout 3 s\)") as failed:
            one.result(timeout=60)
        took = time.monotonic() - started
        assert all(isinstance(f.exception(timeout=60), mqexec.BrokerError) for f in many)
        assert "guest:guest" not in str(failed.value)
        node.start()
        back = time.monotonic()
        again = client.submit(triple, 7)
        assert again.key == one.key  # the same pure call: forgotten when it failed, so it runs now
        assert again.result(timeout=120) == 21
        recovered = time.monotonic() - back
        assert client.gather(client.map(triple, range(100)), errors="raise") == [3 * i for i in range(100)]
    print(f"\nbroker down: BrokerError after {took:.1f} s: {failed.value}; the retry ran in {recovered:.1f} s")
    record(
        "4",
        "publishing while the broker is down (node stopped), publish_timeout 3 s",
        f"`BrokerError` after {took:.1f} s: {str(failed.value).split(': BrokerError')[0]}; the same calls, submitted "
        "again once it is back, run",
        recover_s=recovered,
        lost=0,
        twice=0,
        error_after_s=round(took, 1),
    )
