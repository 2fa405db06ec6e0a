"""Shared fixtures: a real broker, real ``mqexec worker`` processes, isolated per test.

The broker, in this order: ``MQEXEC_TEST_BROKER`` → a RabbitMQ already listening on 127.0.0.1:5672 → a private
``rabbitmq-server`` node started here (own port, own data dir) → otherwise the tests fail with one line saying
how to get a broker. They are never skipped for want of one.

Each test gets its own queue prefix (``mqt<hex>``), so tests never see each other's tasks, and its queues are
deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from netutil import listening
from workerproc import ROOT, Worker

from mqexec.keys import Identity


def _private_rabbit(tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A private node from tests/rabbit.py; stopping its process stops it. Its data lives in the test run's own
    directory (removed at exit), not in ``tmp``."""
    from rabbit import PrivateNode

    node = PrivateNode().start()
    assert node.process is not None
    return node.url(), node.process


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ URL that works, found or started as the module docstring says."""
    if os.environ.get("MQEXEC_TEST_BROKER"):
        yield os.environ["MQEXEC_TEST_BROKER"]
        return
    if listening("127.0.0.1", 5672):
        yield "amqp://guest:guest@127.0.0.1:5672//"
        return
    if shutil.which("rabbitmq-server"):
        url, proc = _private_rabbit(tmp_path_factory.mktemp("rabbit"))
        yield url
        proc.terminate()
        proc.wait(30)
        return
    pytest.fail(
        "no broker: start RabbitMQ (`rabbitmq-server -detached`), install it (`apt-get install "
        "rabbitmq-server`), or set MQEXEC_TEST_BROKER=amqp://user:pw@host:5672/vhost",
        pytrace=False,
    )


@pytest.fixture
def prefix(broker_url: str) -> Iterator[str]:
    """A queue prefix of this test's own; its task and dead-letter queues are deleted afterwards (clients
    delete their own result and blob queues when they close)."""
    from kombu import Connection

    from mqexec.config import Config
    from mqexec.topology import delete_topology

    name = f"mqt{uuid.uuid4().hex[:10]}"
    yield name
    with Connection(broker_url.replace("amqp://", "pyamqp://", 1), connect_timeout=5) as conn:
        channel = conn.channel()
        delete_topology(channel, Config.load(broker_url=broker_url, queue_prefix=name), ("GPU",))
        delete_topology(channel, Config.load(broker_url=broker_url, queue_prefix=name, env="py3.99"))


@pytest.fixture
def identity() -> Identity:
    """This test's own signing identity; its workers are given ``identity.trust.token()``."""
    return Identity.new()


@pytest.fixture
def settings(broker_url: str, prefix: str, tmp_path: Path, identity: Identity) -> dict[str, object]:
    """Client settings for this test: the broker, its own queue prefix and signing identity."""
    return {
        "queue_prefix": prefix,
        "identity": identity.text(),
        "no_worker_grace": 2.0,
        "lease_interval": 1.0,  # a killed worker's tasks are sent again within seconds
        "lease_timeout": 5.0,
        "cache_dir": str(tmp_path / "client-cache"),
    }


@pytest.fixture
def start_worker(broker_url: str, settings: dict[str, object], tmp_path: Path, identity: Identity) -> Iterator[object]:
    """``start_worker("--concurrency", "2")`` → a ready :class:`Worker` for this test's broker and prefix."""
    workers: list[Worker] = []

    def start(
        *args: str,
        broker: str | None = None,
        ready: bool = True,
        secret: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Worker:
        n = len(workers)
        environ = {
            **os.environ,
            "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"]),
            "MQEXEC_SECRET": secret if secret is not None else identity.trust.token(),
            "MQEXEC_CACHE_DIR": str(tmp_path / f"worker{n}-cache"),
            "MQEXEC_LEASE_INTERVAL": str(settings["lease_interval"]),
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
            "MQEXEC_LAKE_URL": "",
            **(env or {}),
        }
        if secret == "":
            environ.pop("MQEXEC_SECRET")
            environ["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
        worker = Worker(
            ["--broker", broker or broker_url, "--hostname", f"w{n}-{settings['queue_prefix']}@test", *args],
            environ,
            tmp_path / f"worker{n}.log",
        )
        workers.append(worker)
        return worker.wait_ready() if ready else worker

    yield start
    for w in workers:
        w.stop()


@pytest.fixture
def client(broker_url: str, settings: dict[str, object]) -> Iterator[object]:
    import mqexec

    with mqexec.Client(broker_url, **settings) as c:
        yield c
