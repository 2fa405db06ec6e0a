"""The futures client against a real RabbitMQ and real ``mqexec worker`` processes."""

from __future__ import annotations

import threading
import time
import traceback

import pytest

import mqexec
from mqexec import FIRST_COMPLETED, SerializationError, as_completed, wait


def slow_square(x: int, delay: float = 0.0) -> int:
    time.sleep(delay)
    return x * x


@pytest.fixture
def worker(start_worker):
    return start_worker("--concurrency", "2")


def test_submit_lambda_and_closure(worker, client):
    offset = 100
    assert client.submit(lambda x: x + 1, 41).result(timeout=30) == 42
    assert client.submit(lambda x: x + offset, 1).result(timeout=30) == 101


def test_map_gather_and_as_completed(worker, client):
    futures = client.map(slow_square, range(1000))
    assert sum(client.gather(futures)) == sum(x * x for x in range(1000))
    seen = {f.key: v for f, v in as_completed(futures, with_results=True)}
    assert len(seen) == 1000 and sorted(seen.values()) == sorted(x * x for x in range(1000))


def test_kwargs_and_nested_future_arguments(worker, client):
    a = client.submit(slow_square, 3)
    b = client.submit(slow_square, 4)
    total = client.submit(lambda xs, d: sum(xs) + d["c"], [a, b], {"c": a})
    assert total.result(timeout=30) == 9 + 16 + 9
    assert client.submit(slow_square, x=5, delay=0.0).result(timeout=30) == 25


def test_remote_exception_keeps_type_and_traceback(worker, client):
    def fails(x):
        raise KeyError(f"no such thing {x}")

    fut = client.submit(fails, 7)
    with pytest.raises(KeyError, match="no such thing 7") as info:
        fut.result(timeout=30)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].name == "fails" and frames[-1].filename == __file__  # the remote frame, at the user's file
    assert "raise KeyError" in frames[-1].line
    assert any("raised on mqexec worker w0-" in note for note in info.value.__notes__)
    assert fut.status == "error"
    assert isinstance(fut.exception(), KeyError)
    assert traceback.extract_tb(fut.traceback())[-1].name == "fails"


def test_dependency_error_propagates(worker, client):
    bad = client.submit(lambda: 1 / 0)
    dependent = client.submit(lambda x: x + 1, bad)
    with pytest.raises(ZeroDivisionError):
        dependent.result(timeout=30)


def test_gather_errors_skip(worker, client):
    futs = [client.submit(lambda x: 10 // x, x) for x in (1, 0, 2)]
    assert client.gather(futs, errors="skip") == [10, 5]
    with pytest.raises(ZeroDivisionError):
        client.gather(futs)


def test_pure_keys_are_deterministic(worker, client):
    a = client.submit(slow_square, 12)
    b = client.submit(slow_square, 12)
    c = client.submit(slow_square, 12, pure=False)
    assert a.key == b.key and a.key.startswith("slow_square-") and c.key != a.key
    assert client.submit(slow_square, 13, key="mine").key == "mine"


def test_wait_first_completed_and_timeout(worker, client):
    fast = client.submit(slow_square, 2)
    slow = client.submit(slow_square, 3, delay=5, pure=False)
    done, not_done = wait([fast, slow], return_when=FIRST_COMPLETED, timeout=30)
    assert fast in done and slow in not_done
    with pytest.raises(TimeoutError):
        wait([slow], timeout=0.2)
    done, not_done = wait([fast, slow], timeout=30)
    assert not not_done


def test_as_completed_add_while_iterating(worker, client):
    ac = as_completed([client.submit(slow_square, 1)])
    results = []
    for fut in ac:
        results.append(fut.result())
        if len(results) < 3:
            ac.add(client.submit(slow_square, len(results) + 1))
    assert sorted(results) == [1, 4, 9]


def test_done_callback_fires_once(worker, client):
    fired = []
    event = threading.Event()
    fut = client.submit(slow_square, 6)
    fut.add_done_callback(lambda f: (fired.append(f.result()), event.set()))
    assert event.wait(30)
    time.sleep(0.2)
    assert fired == [36]


def test_retries_rerun_on_the_worker(worker, client, tmp_path):
    marker = tmp_path / "attempts"

    def flaky():
        with open(marker, "a") as fh:
            fh.write("x")
        if len(marker.read_text()) < 3:
            raise RuntimeError("not yet")
        return "ok"

    assert client.submit(flaky, retries=2).result(timeout=30) == "ok"
    assert marker.read_text() == "xxx"
    marker.unlink()
    with pytest.raises(RuntimeError, match="not yet"):
        client.submit(flaky, retries=1, pure=False).result(timeout=30)


def test_cancel_a_queued_task(start_worker, client, tmp_path):
    start_worker("--concurrency", "1")
    ran = tmp_path / "ran"
    blocker = client.submit(slow_square, 1, delay=3, pure=False)
    queued = client.submit(lambda: ran.write_text("ran"), pure=False)
    assert queued.cancel()
    assert queued.cancelled() and queued.status == "cancelled"
    assert blocker.result(timeout=30) == 1
    time.sleep(1.5)
    assert not ran.exists()


def test_scatter_is_content_addressed(worker, client):
    data = bytes(range(256)) * 4096  # 1 MiB: shipped once as a blob
    a = client.scatter(data)
    b = client.scatter(data)
    assert a.key == b.key and a.done() and a.result() is data
    assert client.submit(len, a).result(timeout=30) == len(data)
    left, right = client.scatter([[1, 2], [3, 4]])
    assert client.submit(lambda x, y: x + y, left, right).result(timeout=30) == [1, 2, 3, 4]


def test_unpicklable_function_fails_at_submit_naming_it(client):
    lock = threading.Lock()

    def uses_lock():
        return lock.locked()

    with pytest.raises(SerializationError, match=r"uses_lock.*lock"):
        client.submit(uses_lock)
    with pytest.raises(SerializationError, match="argument"):
        client.submit(print, threading.Lock())


def test_big_function_goes_on_the_wire_once(worker, client, broker_url):
    """A 5 MB closure called 200 times: the client sends ~5 MB, not 1 GB (measured at the broker)."""
    blob = bytes(range(256)) * (5 * 1024 * 1024 // 256)

    def size_of_blob(i):
        return len(blob) + i

    before = _client_bytes_sent(client)
    futures = client.map(size_of_blob, range(200), batch_size=1)
    assert client.gather(futures) == [len(blob) + i for i in range(200)]
    sent = _client_bytes_sent(client) - before
    assert 5e6 < sent < 12e6, f"client sent {sent / 1e6:.1f} MB for 200 calls of a 5 MB closure"


def _client_bytes_sent(client) -> int:
    """Bytes the broker has received on the client's producer connection (``rabbitmqctl``)."""
    import subprocess

    port = client._courier._out.connection.sock.getsockname()[1]
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "peer_port", "recv_oct"], capture_output=True, text=True, timeout=30
    ).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == str(port):
            return int(fields[1])
    raise AssertionError(f"no broker connection from port {port}:\n{out}")


def test_results_are_forgotten_with_their_last_handle(worker, client):
    """A long run keeps no finished results that nobody holds (memory stays flat)."""
    import gc

    kept = client.submit(slow_square, 3)
    for i in range(200):
        assert client.submit(slow_square, i, pure=False).result(timeout=30) == i * i
    gc.collect()
    deadline = time.monotonic() + 10
    while len(client._ledger.states) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(client._ledger.states) == {kept.key}
    assert kept.result() == 9


def test_scatter_of_nested_lists_scatters_the_top_level(worker, client):
    (inner,) = client.scatter([[1, 2, 3]])
    assert isinstance(inner, mqexec.Future) and inner.result() == [1, 2, 3]
    assert client.submit(sum, inner).result(timeout=30) == 6


def test_wait_for_workers_names_them_or_says_how_many_answered(start_worker, client):
    start_worker()
    start_worker()
    names = client.wait_for_workers(2, timeout=30)
    assert len(names) == 2 and all(client.config.queue_prefix in n for n in names)
    with pytest.raises(TimeoutError, match=r"2 of 3 workers of queue prefix .* answered within 1 s"):
        client.wait_for_workers(3, timeout=1)


def _dec(x):
    return x - 1


def _div(x, y):
    return x / y


def test_recreate_error_locally_after_its_arguments_futures_are_gone(worker, client):
    """The argument's future was a temporary: once the failed call settled, the client forgot that key. Recreating
    the call still has its value (kept with the finished call); it waited for ever on a new, unsettled state."""
    import gc

    bad = client.submit(_div, 1, client.submit(_dec, 1))
    assert isinstance(bad.exception(timeout=60), ZeroDivisionError)
    gc.collect()
    client._ledger.purge()
    assert not any(k.startswith("_dec-") for k in client._ledger.states)  # forgotten, as in the CI run that hung
    with pytest.raises(ZeroDivisionError):
        client.recreate_error_locally(bad)
    assert client.recreate_task_locally(client.submit(_dec, 5)) == 4
