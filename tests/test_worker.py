"""``mqexec worker`` as a grid job: idle exit, walltime drain, SIGTERM drain, fast clear failures, no ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_reliability import record_and_sleep

from mqexec.keys import Identity


def _wait_exit(worker, timeout: float) -> int:
    return worker.proc.wait(timeout)


def test_idle_timeout_exits_cleanly(start_worker, client):
    worker = start_worker("--concurrency", "1", "--idle-timeout", "3")
    assert client.submit(lambda: 5).result(timeout=30) == 5
    assert _wait_exit(worker, 30) == 0
    assert "idle for" in worker.text() and "--idle-timeout" in worker.text()


def test_max_walltime_drains_running_tasks_then_exits(start_worker, client, tmp_path):
    log = tmp_path / "runs"
    worker = start_worker("--concurrency", "1", "--max-walltime", "60", "--drain-margin", "57")  # drains at 3 s
    running = client.submit(record_and_sleep, str(log), 1, 5.0)
    assert running.result(timeout=30) == 10  # finished although the drain began while it ran
    assert _wait_exit(worker, 30) == 0
    assert "walltime drain" in worker.text()
    late = client.submit(record_and_sleep, str(log), 2, 0.0)
    time.sleep(1)
    assert not late.done()  # nobody takes it: the drained worker is gone...
    start_worker("--concurrency", "1")
    assert late.result(timeout=30) == 20  # ...and it waited in the queue for the next one


def test_sigterm_finishes_the_running_task(start_worker, client, tmp_path):
    log = tmp_path / "runs"
    worker = start_worker("--concurrency", "1")
    fut = client.submit(record_and_sleep, str(log), 7, 3.0)
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().endswith("\n")):  # a whole line: it really started
        assert time.monotonic() < deadline and not fut.done(), fut
        time.sleep(0.05)
    os.kill(worker.proc.pid, signal.SIGTERM)
    assert fut.result(timeout=30) == 70
    assert _wait_exit(worker, 30) == 0
    assert len(log.read_text().splitlines()) == 1


def test_worker_never_listens_on_a_port(start_worker, client):
    worker = start_worker("--concurrency", "2")
    assert client.submit(lambda: 1).result(timeout=30) == 1
    proc = psutil.Process(worker.proc.pid)
    for p in [proc, *proc.children(recursive=True)]:
        listening = [c for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        assert not listening, f"{p.pid} listens on {listening}"
    outbound = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_ESTABLISHED]
    assert outbound and all(
        c.raddr.port == int(client.config.broker_url.rsplit(":", 1)[1].split("/")[0]) for c in outbound
    )


IDENTITY = Identity.new().text()
TOKEN = Identity.parse(IDENTITY).trust.token()


def _run_worker_cli(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mqexec", "worker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MQEXEC_SECRET": TOKEN, **(env or {})},
    )
    return proc.returncode, proc.stderr, time.monotonic() - started


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:hunter2x@127.0.0.1:5672//", "refused the login of user 'guest': wrong user name or password"),
        ("amqp://guest:guest@127.0.0.1:1//", "nothing accepts connections at 127.0.0.1:1"),
        ("amqp://guest:guest@no-such-host.invalid:5672//", "cannot resolve the broker host 'no-such-host.invalid'"),
        ("amqp://guest:guest@127.0.0.1:5672/no-such-vhost", "vhost 'no-such-vhost'"),
        ("amqq://guest:guest@127.0.0.1:5672//", "did you mean amqp://"),
        ("amqp:guest:hunter2x@127.0.0.1:5672", "lacks '//' after 'amqp:'"),
        ("amqp://guest:hunter2x@127.0.0.1:notaport//", "has port 'notaport': not a number from 1 to 65535"),
        ("amqp://guest:hunter2x@127.0.0.1:99999//", "has port '99999': not a number from 1 to 65535"),
    ],
)
def test_bad_broker_fails_fast_with_a_clear_error(url, expected):
    code, err, seconds = _run_worker_cli(["--broker", url])
    assert code == 2, err
    assert expected in err and "mqexec: error:" in err
    assert "hunter2x" not in err  # the password is never printed
    assert seconds < 10


def test_worker_without_a_signing_key_refuses_to_start(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MQEXEC_SECRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mqexec", "worker", "--broker", "amqp://guest:guest@127.0.0.1//"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "XDG_CONFIG_HOME": str(tmp_path)},
    )
    assert proc.returncode == 2
    assert "this worker has no key" in proc.stderr and "MQEXEC_SECRET" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one sentence, no traceback


def test_client_bad_broker_fails_fast():
    import mqexec

    started = time.monotonic()
    with pytest.raises(mqexec.BrokerError, match="refused the login"):
        mqexec.Client("amqp://guest:nope@127.0.0.1:5672//", identity=IDENTITY)
    with pytest.raises(mqexec.BrokerError, match="nothing accepts connections"):
        mqexec.Client("amqp://guest:guest@127.0.0.1:1//", identity=IDENTITY)
    with pytest.raises(mqexec.ConfigError, match="did you mean"):
        mqexec.Client("amqps2://x@y//", identity=IDENTITY)
    assert time.monotonic() - started < 20
