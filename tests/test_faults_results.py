"""Issue 9, cases 5 and 6 on the fault node (``test_faults.py``): results above the broker's message limit (200 MB
and 600 MB, with and without a data lake; a batch of results together above it; pieces above it), and a worker
with the wrong identity among good ones."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rabbit import PrivateNode
from reliability_log import record
from test_faults import MB, big_result, fixture_node, fixture_on_node, messages_in, runs  # noqa: F401 - the node, on_node fixtures
from test_reliability import record_and_sleep
from workerproc import Worker

import mqexec


# ------------------------------------------------------------------------------------------- 5. big results
@pytest.mark.timeout(600)
@pytest.mark.parametrize("via", ["pieces", "lake"])
def test_results_above_the_message_limit(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path, via: str
) -> None:
    import hashlib

    from rabbit import RABBITMQ_4_MAX_MESSAGE_SIZE

    lake: dict[str, Any] = {"lake_url": f"file://{tmp_path}/lake"} if via == "lake" else {}
    start_worker("--concurrency", "1", broker=node.url())
    figures = {}
    with mqexec.Client(node.url(), **on_node, **lake) as client:
        for size in (200 * MB, 600 * MB):
            started = time.monotonic()
            value = client.submit(big_result, size, pure=False).result(timeout=120)
            figures[size // MB] = round(time.monotonic() - started, 1)
            assert len(value) == size
            assert hashlib.sha256(value).digest() == hashlib.sha256(big_result(size)).digest()
            del value
        assert client.stats()["in_flight"] == 0
        assert messages_in(node.url(), client.reply_to) == 0  # no piece left behind
    if via == "lake":
        assert sum(f.stat().st_size for f in (tmp_path / "lake").rglob("*") if f.is_file()) >= 800 * MB
    limit = RABBITMQ_4_MAX_MESSAGE_SIZE >> 20
    print(f"\nresults via {via} (max_message_size {limit} MiB): seconds by size in MB {figures}")
    where = "a file:// lake" if via == "lake" else "no lake"
    record(
        f"5-{via}",
        f"results of 200 MB and 600 MB, broker max_message_size 16 MiB, {where}",
        f"the values ({'read from the lake' if via == 'lake' else 'sent in 8 MiB pieces'}), in "
        + " and ".join(f"{s:g} s" for s in figures.values()),
        recover_s=None,
        lost=0,
        twice=0,
        seconds=figures,
    )


def test_a_batch_of_results_above_the_limit_together_and_pieces_above_the_broker_limit(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker]
) -> None:
    """Two ways to exceed the broker's limit without one big value: a batch of 2 MB results (20 in one message
    would be 40 MB), and a worker whose piece_size (32 MiB) is above the broker's max_message_size (16 MiB)."""
    big = start_worker("--concurrency", "1", broker=node.url(), env={"MQEXEC_PIECE_SIZE": str(32 << 20)})
    with mqexec.Client(node.url(), **on_node) as client:
        started = time.monotonic()
        values = client.gather(client.map(big_result, [2 * MB + i for i in range(20)], batch_size=20))
        assert [len(v) for v in values] == [2 * MB + i for i in range(20)]
        assert values[7] == big_result(2 * MB + 7)
        assert client.submit(big_result, 40 * MB).result(timeout=120) == big_result(40 * MB)
        took = time.monotonic() - started
    assert big.text().count("the broker refuses messages over 16777216 bytes") == 1, big.text()[-3000:]
    print(f"\nbatch of 20 x 2 MB and 40 MB with pieces above the broker limit: {took:.1f} s")
    record(
        "5-batch",
        "a batch of 20 results of 2 MB (40 MB in one message), and piece_size above the broker's 16 MiB limit",
        "the values (the worker warns once and cuts smaller pieces)",
        recover_s=None,
        lost=0,
        twice=0,
        seconds=round(took, 1),
    )


def test_client_pieces_above_the_broker_limit_fail_those_calls_saying_so(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker]
) -> None:
    """A client whose piece_size (32 MiB) is above the broker's max_message_size (16 MiB): the call with a 20 MB
    argument fails within seconds with the fix named (it was sent again for ever); the next such submit raises at
    once; calls with smaller arguments run."""
    from mqexec.errors import BrokerError

    start_worker("--concurrency", "1", broker=node.url())
    with mqexec.Client(node.url(), **on_node, piece_size=32 << 20) as client:
        started = time.monotonic()
        doomed = client.submit(len, b"x" * (20 * MB), pure=False)
        with pytest.raises(BrokerError, match=r"refuses messages over 16777216 bytes .* set piece_size .* below"):
            doomed.result(timeout=60)
        took = time.monotonic() - started
        with pytest.raises(BrokerError, match="max_message_size"):
            client.submit(len, b"y" * (20 * MB), pure=False)
        assert client.submit(len, b"z" * (10 * MB), pure=False).result(timeout=60) == 10 * MB
        assert client.submit(len, b"small").result(timeout=60) == 5
        assert client.stats()["in_flight"] == 0
    print(f"\nclient piece above the broker limit: failed after {took:.1f} s")


# --------------------------------------------------------------------------------------- 6. wrong identity
def test_a_worker_with_the_wrong_identity_costs_the_run_nothing(
    node: PrivateNode, on_node: dict[str, Any], start_worker: Callable[..., Worker], tmp_path: Path
) -> None:
    from mqexec.keys import Identity

    log = tmp_path / "runs"
    good = [start_worker("--concurrency", "1", broker=node.url()) for _ in range(2)]
    wrong = start_worker("--concurrency", "1", broker=node.url(), secret=Identity.new().trust.token())
    with mqexec.Client(node.url(), **on_node) as client:
        futures = client.map(record_and_sleep, [str(log)] * 200, range(200), [0.01] * 200)
        done = client.gather(futures, errors="skip")
        failed = [f.exception() for f in futures if f.status == "error"]
        stats = client.stats()["counts"]
    with contextlib.suppress(subprocess.TimeoutExpired):
        wrong.proc.wait(30)
    code = wrong.proc.poll()
    counts = runs(log)
    print(f"\nwrong identity: exit code {code}, {len(failed)} failed ({failed[:1]}), {stats}")
    sees = (
        f"{len(failed)} of 200 fail with `{type(failed[0]).__name__}`: {failed[0]}; the worker goes on (exit code "
        f"{code})"
        if failed
        else "all 200 results; the wrong worker exits with code 3 at its first task, naming the key mismatch"
    )
    record(
        "6",
        "one worker with the wrong identity among good ones, 200 tasks",
        sees,
        recover_s=None,
        lost=len(failed),
        twice=sum(c - 1 for c in counts.values()),
    )
    assert code == 3
    assert "this worker's key is not the client's" in wrong.text()
    assert not failed and done == [i * 10 for i in range(200)]
    assert all(w.proc.poll() is None for w in good)
