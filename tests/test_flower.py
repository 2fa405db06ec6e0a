"""Celery Flower, started by ``mqexec flower``, shows mqexec's workers and tasks readably — in its API and in a
real (headless) browser. It reaches no worker directly: events and inspection go through the broker.

Set ``MQEXEC_DOCS_IMG=docs/img`` to refresh the screenshots docs/observability.md shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import dump_dom, screenshot
from netutil import free_port, listening

from mqexec.errors import ConfigError
from mqexec.flowerui import flower_argv

SITE, JOB = "LCG.Example.org", "4242"


@pytest.fixture
def flower(broker_url: str, settings: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true", "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"]),
           "MQEXEC_IDENTITY": str(settings["identity"])}  # fmt: skip
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


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=20) as response:
        return json.load(response)


class TtbarAnalysis:
    """Named like the AGC processor: Flower shows a task by its function's name."""

    def __call__(self, i: int) -> int:
        if i == 3:
            raise ValueError(f"bad chunk {i}")
        time.sleep(0.2)
        return i


def _labels(n: int) -> list[str]:
    return [f"ttbar__nominal/file_{i}.root [{i * 100000}-{(i + 1) * 100000}]" for i in range(n)]


def _warm_up(client: Any, flower: str) -> None:
    """Flower's event consumer binds a moment after its port opens: wait until it sees a task."""
    deadline = time.monotonic() + 60
    while True:
        client.submit(lambda: 0, pure=False, label="warm-up").result(timeout=30)
        time.sleep(0.5)
        if any(t.get("args") == "warm-up" for t in _get(f"{flower}/api/tasks").values()):
            return
        assert time.monotonic() < deadline, "Flower never saw a task"


def _until(what: Any, deadline_s: float = 30) -> Any:
    deadline = time.monotonic() + deadline_s
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def _start_two(start_worker: Any) -> list[str]:
    names = ["mqexec-py3.11-4242@wn042.example.org", "mqexec-py3.11-777@laptop.local"]
    start_worker("--concurrency", "2", "--hostname", names[0], env={"DIRACSITE": SITE, "JOBID": JOB})
    start_worker("--concurrency", "1", "--hostname", names[1], "--resources", "GPU=1")
    return names


def test_flower_shows_workers_and_readable_tasks_in_a_browser(
    flower: str, start_worker: Any, client: Any, tmp_path: Path
) -> None:
    names = _start_two(start_worker)
    _warm_up(client, flower)
    labels = _labels(3)
    futures = client.map(TtbarAnalysis(), range(3), labels=labels, batch_size=1, pure=False)
    assert client.gather(futures) == [0, 1, 2]

    # ---- the API: tasks by name and label, with states and runtimes
    def done() -> dict[str, Any]:
        tasks = {t["args"]: t for t in _get(f"{flower}/api/tasks").values() if t.get("args") in labels}
        return tasks if len(tasks) == 3 and all(t["state"] == "SUCCESS" for t in tasks.values()) else {}

    tasks = _until(done)
    assert sorted(tasks) == sorted(labels), _get(f"{flower}/api/tasks")
    for t in tasks.values():
        assert t["name"] == "TtbarAnalysis"
        assert t["runtime"] is not None and t["runtime"] > 0
        assert t["worker"] in names
        assert "mqxk" not in json.dumps(t) and "mqxw" not in json.dumps(t)  # no key material

    # ---- the API: both workers, with the mqexec block (environment, resources, site, job)
    def both() -> dict[str, Any]:
        listed = _get(f"{flower}/api/workers?refresh=1")
        return listed if set(names) <= set(listed) else {}

    workers = _until(both)
    assert set(names) <= set(workers), workers.keys()
    grid = workers[names[0]]["stats"]["mqexec"]
    assert (grid["site"], grid["dirac_job"], grid["env"]) == (
        SITE,
        JOB,
        f"py{sys.version_info[0]}.{sys.version_info[1]}",
    )
    assert workers[names[1]]["stats"]["mqexec"]["resources"] == {"GPU": 1.0}

    # ---- a person's view: the pages list them once their scripts ran
    workers_page = dump_dom(f"{flower}/workers")
    for name in names:
        assert name in workers_page
    tasks_page = dump_dom(f"{flower}/tasks")
    assert "TtbarAnalysis" in tasks_page
    for label in labels:
        assert label in tasks_page, tasks_page[-2000:]
    worker_page = dump_dom(f"{flower}/worker/{names[0]}")
    assert SITE in worker_page and JOB in worker_page
    shots = {
        "flower-workers.png": screenshot(f"{flower}/workers", tmp_path / "flower-workers.png", size=(1400, 560)),
        "flower-tasks.png": screenshot(f"{flower}/tasks", tmp_path / "flower-tasks.png", size=(1400, 760)),
        "flower-worker.png": screenshot(  # its "Other" tab: the mqexec block of the worker's stats
            f"{flower}/worker/{names[0]}#tab-other", tmp_path / "flower-worker.png", size=(1400, 760)
        ),
    }
    for shot in shots.values():
        assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    if os.environ.get("MQEXEC_DOCS_IMG"):
        for name, shot in shots.items():
            shutil.copy(shot, Path(os.environ["MQEXEC_DOCS_IMG"]) / name)


def test_flower_shows_a_failed_chunk_with_its_exception(flower: str, start_worker: Any, client: Any) -> None:
    _start_two(start_worker)
    _warm_up(client, flower)
    label = _labels(4)[3]
    future = client.submit(TtbarAnalysis(), 3, label=label, pure=False)
    with pytest.raises(ValueError, match="bad chunk 3"):
        future.result(timeout=60)
    ended = ("FAILURE", "SUCCESS")  # the client hears of the outcome before Flower hears of the task's end
    task = _until(
        lambda: [t for t in _get(f"{flower}/api/tasks").values() if t.get("args") == label and t["state"] in ended]
    )
    assert task, "Flower never saw the failing task end"
    assert task[0]["state"] == "FAILURE" and "bad chunk 3" in str(task[0]["exception"])


def test_flower_binds_loopback_unless_protected() -> None:
    assert flower_argv("127.0.0.1", 5555, None)[1] == "--address=127.0.0.1"
    with pytest.raises(ConfigError, match=r"refusing to serve Flower on 0\.0\.0\.0 without --basic-auth"):
        flower_argv("0.0.0.0", 5555, None)
    assert "--basic-auth=ana:pw" in flower_argv("0.0.0.0", 8080, "ana:pw")
    with pytest.raises(ConfigError, match="user:password"):
        flower_argv("127.0.0.1", 5555, "nocolon")


def test_flower_asks_for_the_password_it_was_given(broker_url: str, settings: dict[str, Any], tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"]), "MQEXEC_FLOWER_AUTH": "ana:s3cret",
           "MQEXEC_IDENTITY": str(settings["identity"])}  # fmt: skip
    with open(tmp_path / "flower.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mqexec", "flower", "--broker", broker_url, "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            assert _until(lambda: listening("127.0.0.1", port)), (tmp_path / "flower.log").read_text()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=10)
            assert refused.value.code == 401
            request = urllib.request.Request(f"http://127.0.0.1:{port}/workers")
            request.add_header("Authorization", "Basic YW5hOnMzY3JldA==")  # ana:s3cret
            with urllib.request.urlopen(request, timeout=10) as page:
                assert page.status == 200
        finally:
            proc.kill()
            proc.wait(15)
