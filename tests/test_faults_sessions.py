"""Issue 9, cases 7 and 8 on the fault node (``test_faults.py``): a client SIGKILLed mid-run (its queued tasks
skipped, its queues expired, the next client not waiting behind them), a client away longer than ``session_grace``
(nothing lost), and ``close()`` after a lost connection."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rabbit import PrivateNode
from reliability_log import record
from test_faults import (  # noqa: F401 - the node, on_node fixtures
    fixture_node,
    fixture_on_node,
    logged_at,
    messages_in,
    queue_exists,
    queues,
    stamp_and_sleep,
    stamps,
    triple,
    wait_for,
)
from workerproc import Worker

import mqexec

SESSION_GRACE = 2.0  # workers skip the queued tasks of a client gone this long
SESSION_EXPIRE = 10.0  # ... and the broker deletes its queues this long after it went


# ------------------------------------------------------------------------------------------ 7. dead client
_DOOMED_CLIENT = """
import json, sys
import mqexec
from test_faults import stamp_and_sleep
url, settings, log, n = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
client = mqexec.Client(url, **settings)
print(client.submit(len, bytes(100_000)).result(), flush=True)  # its argument goes as a blob queue
for future in mqexec.as_completed(client.map(stamp_and_sleep, [log] * n, range(n), [0.2] * n, batch_size=1)):
    print(future.result(), flush=True)
"""


@pytest.mark.timeout(240)
def test_a_killed_clients_tasks_are_skipped_and_its_queues_expire(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    import json
    import signal
    import sys

    from workerproc import ROOT

    from mqexec.topology import results_queue_name, task_queue_name

    log, n = tmp_path / "runs", 300
    env = {"MQEXEC_SESSION_GRACE": str(SESSION_GRACE)}
    workers = [start_worker("--concurrency", "1", broker=node.url(), env=env) for _ in range(2)]
    settings = {**on_node, "session_expire": SESSION_EXPIRE}
    child = subprocess.Popen(
        [sys.executable, "-c", _DOOMED_CLIENT, node.url(), json.dumps(settings), str(log), str(n)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
    )
    assert child.stdout is not None
    for _ in range(31):
        assert child.stdout.readline(), "the client process ended early"
    killed_wall, killed = time.time(), time.monotonic()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    cfg = mqexec.Config.load(broker_url=node.url(), **settings)
    session = next(q.split(".")[-1] for q in queues(node) if q.startswith(f"{cfg.queue_prefix}.results."))
    with mqexec.Client(node.url(), **on_node) as nxt:  # the next client's work does not wait behind them
        fresh = nxt.gather(nxt.map(triple, range(20)))
        next_took = time.monotonic() - killed
    assert fresh == [3 * i for i in range(20)]
    wait_for("the dead client's task queue drained", lambda: messages_in(node.url(), task_queue_name(cfg)) == 0, 60)
    drained = time.monotonic() - killed
    skipped = [logged_at(w.text(), f"its client (session {session}) is gone", killed_wall) for w in workers]
    blob = f"{cfg.queue_prefix}.blob."
    assert any(q.startswith(blob) for q in queues(node))
    session_queues = [results_queue_name(cfg, session), *(q for q in queues(node) if q.startswith(blob))]
    wait_for("its queues expired", lambda: not any(queue_exists(node.url(), q) for q in session_queues), 90)
    gone = time.monotonic() - killed
    started = stamps(log)
    after = sorted(t - killed_wall for ts in started.values() for t in ts if t > killed_wall)
    skipped_from = [s and round(s - killed_wall, 1) for s in skipped]
    print(
        f"\nkilled client: {len(started)} of {n} tasks started, {len(after)} after the kill (the last "
        f"{after[-1] if after else 0:.1f} s after); workers skipped from {skipped_from} s; queue drained "
        f"{drained:.1f} s, its queues gone {gone:.1f} s after the kill; the next client's 20 tasks took "
        f"{next_took:.1f} s"
    )
    assert any(skipped), [w.text()[-2000:] for w in workers]
    assert not after or after[-1] < SESSION_GRACE + 10  # nothing of it started later: the rest was skipped
    assert len(started) < n
    assert gone < SESSION_EXPIRE + 60
    record(
        "7",
        f"the client SIGKILLed after 30 of {n} results (session_grace {SESSION_GRACE:g} s, session_expire "
        f"{SESSION_EXPIRE:g} s)",
        f"workers skip its {n - len(started)} remaining tasks; its queues go; the next client's 20 tasks in "
        f"{next_took:.1f} s",
        recover_s=max(s for s in skipped if s) - killed_wall,
        lost=0,
        twice=0,
        queue_drained_s=round(drained, 1),
        session_queues_gone_s=round(gone, 1),
        started_after_kill=len(after),
    )


def test_a_client_away_longer_than_session_grace_loses_nothing(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    """The client's connections go silent and it cannot reconnect for 10 s (workers meanwhile skip its queued
    tasks as a dead client's); when it is back, those tasks are sent again and every call completes."""
    from halfopen import HalfOpenRelay

    log, n = tmp_path / "runs", 200
    env = {"MQEXEC_SESSION_GRACE": str(SESSION_GRACE)}
    workers = [start_worker("--concurrency", "1", broker=node.url(), env=env) for _ in range(2)]
    relay = HalfOpenRelay("127.0.0.1", node.amqp_port)
    with relay, mqexec.Client(relay.url(node.url()), **on_node) as client:
        futures = client.map(stamp_and_sleep, [str(log)] * n, range(n), [0.2] * n, batch_size=1)
        wait_for("20 results", lambda: sum(f.done() for f in futures) >= 20, 60)
        relay.target, target = ("127.0.0.1", 1), relay.target  # new connections are refused meanwhile
        relay.freeze()
        time.sleep(10)
        relay.target = target
        back = time.monotonic()
        assert client.gather(futures) == list(range(n))
        recovered = time.monotonic() - back
        stats = client.stats()["counts"]
    skipped = sum("is gone" in w.text() for w in workers)
    started = stamps(log)
    print(f"\nclient away 10 s: {recovered:.1f} s to all {n} results after it was back; {stats}")
    assert set(started) == set(range(n))
    assert skipped > 0, "the workers took the client for gone (else this test proves nothing)"
    record(
        "7-back",
        f"the client's connections silent and no reconnect for 10 s (> session_grace {SESSION_GRACE:g} s)",
        "all results: the tasks workers skipped meanwhile are sent again when it is back",
        recover_s=recovered,
        lost=0,
        twice=sum(len(t) - 1 for t in started.values()),
        resent=stats.get("resent", 0),
    )


# ----------------------------------------------------------------------------- 8. close() after a lost connection
def test_close_after_a_lost_connection_cleans_up_or_says_what_it_left(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    start_worker("--concurrency", "1", broker=node.url())
    caplog.set_level(logging.WARNING, logger="mqexec.client")
    client = mqexec.Client(node.url(), **{**on_node, "session_expire": SESSION_EXPIRE})
    assert client.submit(len, bytes(100_000)).result(timeout=60) == 100_000  # a blob queue too
    blob = f"{client.config.queue_prefix}.blob."
    mine = [q for q in queues(node) if client.session in q or q.startswith(blob)]
    assert len(mine) >= 2, mine  # results, the argument's blob (and the shipped code's)
    node.close_all_connections("fault test: close after a blip")
    started = time.monotonic()
    client.close()
    blip_close = time.monotonic() - started
    left = [q for q in queues(node) if q in mine]
    assert not left, left  # it reconnected to clean up

    client = mqexec.Client(node.url(), **{**on_node, "session_expire": SESSION_EXPIRE})
    assert client.submit(len, bytes(100_001)).result(timeout=60) == 100_001
    mine = [q for q in queues(node) if client.session in q or q.startswith(blob)]
    node.stop()
    started = time.monotonic()
    client.close()
    down_close = time.monotonic() - started
    said = [r for r in caplog.records if r.levelno >= logging.WARNING and "could not delete" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    assert f"{SESSION_EXPIRE:g} s" in said[-1].getMessage() and "guest:guest" not in said[-1].getMessage()
    assert down_close < 30
    node.start()
    wait_for("the queues it left expired", lambda: not any(q in queues(node) for q in mine), SESSION_EXPIRE + 60)
    print(f"\nclose after a blip: {blip_close:.1f} s, queues deleted; broker down: {down_close:.1f} s")
    record(
        "8",
        "`close()` after a lost connection (a blip; the broker down)",
        "after a blip the queues are deleted; broker down: a warning, "
        + re.sub(r" \(amqp[^)]*\)|client \w+ ", "", said[-1].getMessage()),
        recover_s=down_close,
        lost=0,
        twice=0,
        blip_close_s=round(blip_close, 1),
    )
