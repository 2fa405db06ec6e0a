"""``mqexec status`` after real runs: queue depths and consumers, one poison task in ``P.dead``, workers with their
site and job, tasks/s from the workers' counts and from RabbitMQ's management API, clients, ``--watch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from forge import publish
from rabbit import fixture_rabbit_node  # noqa: F401

import mqexec
from mqexec.config import Config
from mqexec.status import add_rates, snapshot

SITE, JOB = "LCG.Example.org", "4242"
ENV = f"py{sys.version_info[0]}.{sys.version_info[1]}"


def _status(broker: str, prefix: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqexec", "status", "--broker", broker, *args],
        env={**os.environ, "MQEXEC_QUEUE_PREFIX": prefix},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _dead_letters(cfg: Config, count: int) -> None:
    deadline = time.monotonic() + 30
    while snapshot(cfg, timeout=0.2)["dead_letters"] != count:
        assert time.monotonic() < deadline, "the poison task never reached the dead-letter queue"
        time.sleep(0.3)


def test_json_after_a_run_with_one_poison_task(
    broker_url: str, prefix: str, settings: dict[str, Any], start_worker: Any, client: Any
) -> None:
    start_worker("--concurrency", "2", "--hostname", f"mqexec-{ENV}-{JOB}@wn042.example.org",
                 env={"DIRACSITE": SITE, "JOBID": JOB})  # fmt: skip
    assert client.gather(client.map(lambda x: x * 2, range(5), batch_size=1)) == [0, 2, 4, 6, 8]
    cfg = Config.load(broker_url=broker_url, queue_prefix=prefix)
    publish(cfg, {"not": "a signed task"})  # the worker rejects it, never unpickled: a broker dead letter
    _dead_letters(cfg, 1)

    done = _status(broker_url, prefix, "--json", "--sample", "0")
    assert done.returncode == 0, done.stderr
    snap = json.loads(done.stdout)
    assert snap["prefix"] == prefix and snap["broker"] == broker_url.replace("guest:guest", "guest:***")
    assert snap["dead_letters"] == 1
    assert snap["queues"] == [
        {"name": f"{prefix}.{ENV}", "depth": 0, "consumers": 1, "tasks_per_s": None, "env": ENV, "resource": None}
    ]
    (worker,) = snap["workers"]
    assert worker["name"] == f"mqexec-{ENV}-{JOB}@wn042.example.org"
    assert (worker["host"], worker["site"], worker["dirac_job"], worker["env"]) == ("wn042.example.org", SITE, JOB, ENV)
    assert (worker["resources"], worker["queues"], worker["concurrency"]) == ({}, [f"{prefix}.{ENV}"], 2)
    assert (worker["taken"], worker["done"], worker["running"]) == (5, 5, 0)  # the poison one was never taken
    assert worker["uptime_s"] >= 0
    assert snap["clients"] is None and snap["rates"] == {"source": None, "window_s": None}

    text = _status(broker_url, prefix, "--sample", "0")
    assert text.returncode == 0, text.stderr
    assert f"{prefix}.dead (dead letters)" in text.stdout
    row = next(line for line in text.stdout.splitlines() if line.startswith(worker["name"]))
    assert row.split()[1:6] == [ENV, "-", SITE, JOB, "0/2"]


def test_tasks_per_second_from_the_workers_counts(
    broker_url: str, prefix: str, settings: dict[str, Any], start_worker: Any, client: Any
) -> None:
    start_worker("--concurrency", "1")
    start_worker("--concurrency", "1", "--resources", "GPU=1")
    cfg = Config.load(broker_url=broker_url, queue_prefix=prefix)
    before = snapshot(cfg)
    assert client.gather(client.map(lambda x: x, range(12), batch_size=1)) == list(range(12))
    now = snapshot(cfg)
    add_rates(now, [before])
    span = now["time"] - before["time"]
    assert now["rates"] == {"source": "workers", "window_s": round(span, 1)}
    assert abs(now["tasks_per_s"] * span - 12) < 1e-6  # every call taken once, by one of the two
    plain, gpu = f"{prefix}.{ENV}", f"{prefix}.{ENV}.GPU"
    queues = {q["name"]: q["tasks_per_s"] for q in now["queues"]}
    assert queues[gpu] is None and queues[plain] is None  # the GPU worker consumes both: not attributable
    assert {w["name"]: w["queues"] for w in now["workers"]}[f"w1-{prefix}@test"] == [plain, gpu]


def test_watch_prints_a_document_per_refresh_with_rates(
    broker_url: str, prefix: str, settings: dict[str, Any], start_worker: Any, client: Any
) -> None:
    start_worker("--concurrency", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqexec", "status", "--broker", broker_url, "--json", "--watch", "0.5"],
        env={**os.environ, "MQEXEC_QUEUE_PREFIX": prefix},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        client.gather(client.map(lambda x: x, range(6), batch_size=1))
        later: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while not later.get("tasks_per_s"):
            assert time.monotonic() < deadline, later
            later = json.loads(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(15)
    assert first["rates"]["source"] is None  # nothing to compare with yet
    assert later["rates"]["source"] == "workers" and later["rates"]["window_s"] <= 61
    assert later["queues"][0]["tasks_per_s"] == later["tasks_per_s"] > 0


def test_management_api_lists_clients_and_rates(rabbit_node: Any, settings: dict[str, Any], start_worker: Any) -> None:
    node = rabbit_node(management=True)
    start_worker("--concurrency", "1", broker=node.url())
    prefix = str(settings["queue_prefix"])
    management = f"http://127.0.0.1:{node.management_port}"
    with mqexec.Client(node.url(), **settings) as client:
        assert client.gather(client.map(lambda x: x, range(20), batch_size=1)) == list(range(20))
        deadline = time.monotonic() + 60
        while True:  # RabbitMQ collects its statistics every 5 s
            done = _status(node.url(), prefix, "--json", "--management", management)
            assert done.returncode == 0, done.stderr
            snap = json.loads(done.stdout)
            if snap["tasks_per_s"]:
                break
            assert time.monotonic() < deadline, snap
            time.sleep(1)
        assert snap["rates"] == {"source": "management", "window_s": 60.0}
        assert snap["clients"] == [{"session": client.session, "queue": client.reply_to, "consumers": 1, "waiting": 0}]
        assert snap["queues"][0]["name"] == f"{prefix}.{ENV}" and snap["queues"][0]["tasks_per_s"] > 0
    wrong = _status(node.url(), prefix, "--management", management.replace(str(node.management_port), "1"))
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("mqexec: error: cannot read the management API at http://127.0.0.1:1")
