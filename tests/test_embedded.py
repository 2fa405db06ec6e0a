"""The embedded default: ``mqexec.Client()`` with nothing configured, on this machine alone."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import mqexec


@pytest.fixture
def no_broker_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("MQEXEC_BROKER_URL", raising=False)
    monkeypatch.delenv("MQEXEC_SECRET", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    here = os.path.dirname(os.path.abspath(__file__))  # local workers import this suite's helpers
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))


def test_client_with_nothing_configured_runs_tasks(no_broker_configured):
    factor = 3
    with mqexec.Client() as client:
        assert client.config.broker_url.startswith("filesystem://")
        assert client.submit(lambda x: x * factor, 14).result(timeout=60) == 42
        futures = client.map(lambda x: x * x, range(500))
        assert sum(client.gather(futures)) == sum(x * x for x in range(500))
        with pytest.raises(ZeroDivisionError):
            client.submit(lambda: 1 / 0).result(timeout=30)
        workers = [psutil.Process(pid) for pid in client._local.pids()]  # this client's (the process may have more)
        assert workers and all("worker" in " ".join(p.cmdline()) for p in workers)
    time.sleep(0.5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_a_local_worker_killed_mid_task_is_restarted_and_nothing_is_lost(no_broker_configured, tmp_path):
    from test_reliability import record_and_sleep

    log = tmp_path / "runs"
    with mqexec.Client(no_worker_grace=1.0) as client:
        fut = client.submit(record_and_sleep, str(log), 4, 2.0)
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text().endswith("\n")):  # a whole line: it really started
            assert time.monotonic() < deadline and not fut.done(), fut
            time.sleep(0.05)
        (pid,) = client._local.pids()
        os.killpg(pid, signal.SIGKILL)
        assert fut.result(timeout=60) == 40
        assert len(log.read_text().splitlines()) == 2, log.read_text()
        assert client.submit(lambda: 2, pure=False).result(timeout=60) == 2


def test_settings_reach_the_embedded_workers_whole(no_broker_configured):
    """Issue 8's first bug: the embedded workers got four hand-picked settings, so a client with its own queue
    prefix never had a task run (it timed out after 20 s). Now the whole config travels (``MQEXEC_CONFIG``)."""
    with mqexec.Client(queue_prefix="ana", lease_interval=2.0, lease_timeout=9.0) as client:
        worker_config = client.submit(lambda: mqexec.Config.load(), pure=False).result(timeout=60)
        assert (worker_config.queue_prefix, worker_config.lease_interval) == ("ana", 2.0)
        assert not worker_config.identity and worker_config.secret.startswith("mqxw1.")  # the verifying half only


def test_one_embedded_cluster_after_another_in_one_process(no_broker_configured):
    """kombu kept the bindings of every file-system broker of a process in one in-memory state, so the second
    embedded cluster of a process (other settings: another cluster) never got its task queue's binding and its
    tasks were dropped — a notebook's second ``Client()`` hung."""
    for n, grace in enumerate((2.0, 3.0, 4.0)):
        with mqexec.Client(no_worker_grace=grace) as client:
            assert client.submit(lambda x: x * 2, n, pure=False).result(timeout=30) == 2 * n
