"""Celery Flower, started by ``mqexec flower``, watches mqexec tasks live (and reaches no worker directly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from netutil import free_port, listening


@pytest.fixture
def flower(broker_url, settings, tmp_path):
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true", "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"])}
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqexec", "flower", "--broker", broker_url, "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while not listening("127.0.0.1", port):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "flower.log").read_text()
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait(15)
    log.close()


def _tasks(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/tasks", timeout=10) as response:
        return json.load(response)


def test_flower_shows_tasks_by_their_readable_labels(flower, start_worker, client):
    start_worker("--concurrency", "1")
    deadline = time.monotonic() + 60
    while True:  # Flower's event consumer binds a moment after its port opens: wait until it sees a task
        warm = client.submit(lambda: 0, pure=False, label="warm-up")
        warm.result(timeout=30)
        time.sleep(0.5)
        if any(t.get("args") == "warm-up" for t in _tasks(flower).values()):
            break
        assert time.monotonic() < deadline, "Flower never saw a task"
    labels = [f"ttbar__nominal file{i}.root [0:100000]" for i in range(3)]
    futures = client.map(lambda x: x, range(3), labels=labels, batch_size=1, pure=False)
    assert client.gather(futures) == [0, 1, 2]
    deadline = time.monotonic() + 30
    while True:
        seen = {t["args"]: t["state"] for t in _tasks(flower).values() if t.get("args") in labels}
        if seen == dict.fromkeys(labels, "SUCCESS") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    all_tasks = _tasks(flower)
    assert seen == dict.fromkeys(labels, "SUCCESS"), (len(all_tasks), list(all_tasks.values())[-3:])
