"""Nothing lost, nothing counted twice, nothing forged executed — with real workers killed for real."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from forge import make_task, publish

import mqexec
from mqexec.config import Config
from mqexec.keys import Identity
from mqexec.ledger import CallRecord, MessageRecord
from mqexec.topology import task_queue_name


def record_and_sleep(log: str, i: int, delay: float) -> int:
    with open(log, "a") as fh:
        fh.write(f"{i} {os.getpid()}\n")
    time.sleep(delay)
    return i * 10


def die() -> None:
    os._exit(3)


def test_worker_killed_mid_task_runs_again_and_counts_once(start_worker, client, tmp_path):
    log = tmp_path / "runs"
    first = start_worker("--concurrency", "1")
    fut = client.submit(record_and_sleep, str(log), 1, 4.0)
    callbacks = []
    fut.add_done_callback(lambda f: callbacks.append(f.result()))
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().endswith("\n")):  # a whole line: it really started
        assert time.monotonic() < deadline and not fut.done(), fut
        time.sleep(0.05)
    first.kill9()
    start_worker("--concurrency", "1")
    assert fut.result(timeout=60) == 10
    time.sleep(0.5)
    assert callbacks == [10]
    assert len(log.read_text().splitlines()) == 2  # it really ran twice; the client counted it once


def test_poison_task_is_dead_lettered_and_the_rest_completes(start_worker, client):
    start_worker("--concurrency", "1")
    poison = client.submit(die)
    healthy = client.map(lambda x: x + 1, range(50))
    with pytest.raises(
        mqexec.TaskDeadLettered, match=r"die\(\).*started 4 times and its worker died every time \(on w0-.*exitcode 3"
    ):
        poison.result(timeout=120)
    assert client.gather(healthy) == list(range(1, 51))


@pytest.mark.timeout(240)
def test_2000_tasks_on_3_workers_one_killed_twice(start_worker, client, tmp_path):
    log = tmp_path / "runs"
    workers = [start_worker("--concurrency", "1") for _ in range(3)]
    futures = client.map(record_and_sleep, [str(log)] * 2000, range(2000), [0.004] * 2000, batch_size=5)
    done = threading.Event()
    finished = [0]

    def count(_):
        finished[0] += 1
        if finished[0] == len(futures):
            done.set()

    for f in futures:
        f.add_done_callback(count)
    for target in (600, 1200):
        while finished[0] < target:
            time.sleep(0.02)
        workers[0].kill9()
        workers[0] = start_worker("--concurrency", "1")
    assert done.wait(180)
    assert client.gather(futures) == [i * 10 for i in range(2000)]
    assert finished[0] == 2000  # each future settled once, although some tasks ran twice
    runs = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert set(runs) == set(range(2000)) and len(runs) >= 2000


def _write_marker(path: str) -> None:
    Path(path).write_text("executed")


def test_forged_and_tampered_tasks_are_never_executed(start_worker, settings, broker_url, tmp_path, identity):
    worker = start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    cfg = Config.load(broker_url=broker_url, **settings)
    task = make_task(identity, cfg, "s1", _write_marker, str(marker))
    forged = task.sign(Identity(Identity.new().seed, identity.result_secret))  # our key id, another key's signature
    tampered = task.sign(identity)
    tampered["calls"][0]["a"]["i"] = tampered["calls"][0]["a"]["i"][:-4] + "AAA="  # the payload changed, not the sig
    for wire in (forged, tampered, {"just": "garbage"}, "not even a dict"):
        publish(cfg, wire)
    from kombu import Connection

    dead = f"{settings['queue_prefix']}.dead"
    got = []
    deadline = time.monotonic() + 30
    with Connection(broker_url.replace("amqp", "pyamqp", 1)) as conn:
        channel = conn.channel()
        while len(got) < 4 and time.monotonic() < deadline:
            message = channel.basic_get(dead, no_ack=True)
            if message is None:
                time.sleep(0.1)
            else:
                got.append(message)
    assert len(got) == 4, "every rejected message ends in the dead-letter queue"
    assert not marker.exists()
    assert worker.text().count("rejected a task message, never unpickled") == 4


def test_signed_task_from_another_python_is_refused_before_unpickling(start_worker, client, identity, tmp_path):
    start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    task = make_task(identity, client.config, client.session, _write_marker, str(marker), python="2.7")
    state, _ = client._ledger.state("forged-1")
    client._ledger.messages[task.id] = MessageRecord(task.id, ["forged-1"], None, time.monotonic())
    client._ledger.calls["forged-1"] = CallRecord("forged-1", "forged", None, task.calls[0].args, frozenset(),
                                                  message=task.id)  # fmt: skip
    publish(client.config, task.sign(identity), reply_to=client.reply_to)
    assert state.wait(30)
    assert isinstance(state.exception, mqexec.EnvironmentMismatch)
    assert "pickled by Python 2.7" in str(state.exception)
    assert not marker.exists()


def test_no_worker_for_this_environment_says_which_are_connected(start_worker, client):
    start_worker("--concurrency", "1", "--env", "py3.99")
    fut = client.submit(lambda: 1)
    started = time.monotonic()
    with pytest.raises(
        mqexec.NoWorkerError,
        match=rf"no worker serves {client.config.queue_prefix}\.py3\.\d+.*"
        rf"serve: {client.config.queue_prefix}\.py3\.99",
    ):
        fut.result(timeout=30)
    assert time.monotonic() - started < 15


def who(_: object = None) -> str:
    return os.environ.get("WHO", "?")


def test_resources_route_to_workers_that_offer_them(start_worker, client):
    start_worker("--concurrency", "1", "--resources", "GPU=1", env={"WHO": "gpu"})
    start_worker("--concurrency", "1", env={"WHO": "cpu"})
    on_gpu = [client.submit(who, pure=False, resources={"GPU": 1}) for _ in range(6)]
    assert set(client.gather(on_gpu)) == {"gpu"}
    anywhere = client.gather(client.map(who, range(40), pure=False, batch_size=1))
    assert "cpu" in anywhere
    cfg = client.config
    assert task_queue_name(cfg, "GPU") == f"{cfg.queue_prefix}.{cfg.env}.GPU"


def dies_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(3)
    return x


def test_a_poison_call_in_a_coalesced_submit_loop_fails_alone(start_worker, client):
    """A submit loop of a fast function travels in shared messages; a call that kills its worker takes its
    message down once, then goes alone — the others complete, only it fails."""
    start_worker("--concurrency", "2")
    assert client.gather(client.map(dies_on, range(20), [-1] * 20)) == list(range(20))  # the function is fast
    futures = [client.submit(dies_on, x, 13, pure=False) for x in range(200)]
    mqexec.wait(futures, timeout=120)
    failed = [f for f in futures if f.status == "error"]
    assert [f.key for f in failed] == [futures[13].key]
    assert isinstance(failed[0].exception(), mqexec.TaskDeadLettered)
    assert [f.result() for i, f in enumerate(futures) if i != 13] == [x for x in range(200) if x != 13]
    assert client.stats()["counts"]["messages"] < 150  # they did share messages
