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
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _private_rabbit(tmp: Path) -> tuple[str, subprocess.Popen[bytes]]:
    port, dist = _free_port(), _free_port()
    env = {**os.environ, "RABBITMQ_NODENAME": f"mqexec-test-{port}@localhost", "RABBITMQ_NODE_PORT": str(port),
           "RABBITMQ_DIST_PORT": str(dist), "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
           "RABBITMQ_LOG_BASE": str(tmp / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "plugins"),
           "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1"}
    (tmp / "plugins").write_text("[].\n")
    proc = subprocess.Popen(["rabbitmq-server"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not _listening("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"a private rabbitmq-server node did not start (logs in {tmp / 'log'})")
        time.sleep(0.5)
    return f"amqp://guest:guest@127.0.0.1:{port}//", proc


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A RabbitMQ URL that works, found or started as the module docstring says."""
    if os.environ.get("MQEXEC_TEST_BROKER"):
        yield os.environ["MQEXEC_TEST_BROKER"]
        return
    if _listening("127.0.0.1", 5672):
        yield "amqp://guest:guest@127.0.0.1:5672//"
        return
    if shutil.which("rabbitmq-server"):
        url, proc = _private_rabbit(tmp_path_factory.mktemp("rabbit"))
        yield url
        proc.terminate()
        proc.wait(30)
        return
    pytest.fail("no broker: start RabbitMQ (`rabbitmq-server -detached`), install it (`apt-get install "
                "rabbitmq-server`), or set MQEXEC_TEST_BROKER=amqp://user:pw@host:5672/vhost", pytrace=False)


@pytest.fixture
def prefix(broker_url: str) -> Iterator[str]:
    """A queue prefix of this test's own; its task and dead-letter queues are deleted afterwards (clients
    delete their own result and blob queues when they close)."""
    from kombu import Connection

    from mqexec.config import default_env

    name = f"mqt{uuid.uuid4().hex[:10]}"
    yield name
    with Connection(broker_url.replace("amqp://", "pyamqp://", 1), connect_timeout=5) as conn:
        channel = conn.channel()
        for queue in (f"{name}.{default_env()}", f"{name}.{default_env()}.GPU", f"{name}.py3.99", f"{name}.dead"):
            channel.queue_delete(queue)
        for exchange in (name, f"{name}.dlx"):
            channel.exchange_delete(exchange)


@pytest.fixture
def settings(broker_url: str, prefix: str, tmp_path: Path) -> dict[str, object]:
    """Client settings for this test: the broker, its own queue prefix and signing key."""
    return {"queue_prefix": prefix, "secret": f"test-{prefix}", "no_worker_grace": 2.0,
            "cache_dir": str(tmp_path / "client-cache")}


class Worker:
    """A real ``mqexec worker`` process; its log is in ``self.log``."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "mqexec", "worker", *args], env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 30) -> Worker:
        deadline = time.monotonic() + timeout
        while "consuming" not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {timeout} s:\n{self.text()}")
            time.sleep(0.1)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        """``kill -9`` the whole worker: main process and its pool processes."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # orphaned pool processes, if any
        except ProcessLookupError:
            pass
        self._fh.close()


@pytest.fixture
def start_worker(broker_url: str, settings: dict[str, object], tmp_path: Path) -> Iterator[object]:
    """``start_worker("--concurrency", "2")`` → a ready :class:`Worker` for this test's broker and prefix."""
    workers: list[Worker] = []

    def start(*args: str, broker: str | None = None, ready: bool = True, secret: str | None = None,
              env: dict[str, str] | None = None) -> Worker:
        n = len(workers)
        environ = {**os.environ, "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"]),
                   "MQEXEC_SECRET": secret if secret is not None else str(settings["secret"]),
                   "MQEXEC_CACHE_DIR": str(tmp_path / f"worker{n}-cache"), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
                   "MQEXEC_LAKE_URL": "", **(env or {})}
        if secret == "":
            environ.pop("MQEXEC_SECRET")
            environ["XDG_CONFIG_HOME"] = str(tmp_path / "no-config")
        worker = Worker(["--broker", broker or broker_url, "--hostname", f"w{n}-{settings['queue_prefix']}@test",
                         *args], environ, tmp_path / f"worker{n}.log")
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
