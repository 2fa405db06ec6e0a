"""Issue 10, point 4: only the analyst steers the workers — Celery remote control, tried as an attacker would.

Another app on the vhost broadcasts on its own exchange (never ours); on our prefix's exchange, a command that
changes anything is obeyed only when signed by the analyst's identity, for this prefix, fresh and unseen. Flower's
read-only inspection is answered unsigned (and carries no secret). ``cancel()`` revokes this client's own message
ids only. Each test ends by showing the worker still answers and runs tasks — or, for the owner's signed stop,
that it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from test_security import other_prefix, sent_message, sleep_then  # noqa: F401 - other_prefix: a fixture
from workerproc import Worker

import mqexec
from mqexec.app import make_app
from mqexec.config import Config
from mqexec.control import sign, stop_workers
from mqexec.keys import Identity


def _cfg(broker_url: str, settings: dict[str, Any]) -> Config:
    return Config.load(broker_url=broker_url, **settings)


def _hostname(settings: dict[str, Any], n: int = 0) -> str:
    return f"w{n}-{settings['queue_prefix']}@test"  # as conftest's start_worker names its workers


def _inspect(cfg: Config, name: str) -> Any:
    """An unsigned inspection (what Flower and ``mqexec status`` send) of worker ``name``; its reply."""
    return make_app(cfg).control.inspect(destination=[name], timeout=5.0)


def _pool_size(cfg: Config, name: str) -> int:
    stats = _inspect(cfg, name).stats() or {}
    return int(stats[name]["pool"]["max-concurrency"])


def _synced(cfg: Config, name: str) -> None:
    """Wait until ``name`` has handled every command sent before (its mailbox is a FIFO queue)."""
    assert _inspect(cfg, name).ping() == {name: {"ok": "pong"}}


def test_broadcasts_of_other_apps_never_reach_an_mqexec_worker(
    start_worker: Callable[..., Worker], client: mqexec.Client, broker_url: str, settings: dict[str, Any]
) -> None:
    from celery import Celery

    worker = start_worker("--concurrency", "1")
    plain = Celery("someone-else", broker=broker_url.replace("amqp://", "pyamqp://", 1), set_as_current=False)
    plain.control.broadcast("shutdown")  # Celery's default control exchange
    neighbour = Config.load(broker_url=broker_url, queue_prefix=f"{settings['queue_prefix']}x")
    make_app(neighbour, owner=Identity.new()).control.broadcast("shutdown")  # another prefix, signed by its owner
    time.sleep(2.0)  # it would have arrived by now
    assert worker.proc.poll() is None
    assert client.submit(sleep_then, 0, "still here").result(timeout=30) == "still here"
    assert "shutdown" not in worker.text().lower()


def test_unsigned_or_wrongly_signed_commands_are_refused(
    start_worker: Callable[..., Worker],
    client: mqexec.Client,
    broker_url: str,
    settings: dict[str, Any],
    identity: Identity,
) -> None:
    worker = start_worker("--concurrency", "1")
    cfg, name = _cfg(broker_url, settings), _hostname(settings)
    changes: dict[str, dict[str, Any]] = {
        "pool_grow": {"n": 2},
        "autoscale": {"max": 4, "min": 3},
        "add_consumer": {"queue": f"{cfg.queue_prefix}.elsewhere"},
        "cancel_consumer": {"queue": f"{cfg.queue_prefix}.{cfg.env}"},
        "revoke": {"task_id": ["some-message-id"]},
        "rate_limit": {"task_name": "mqexec.run", "rate_limit": "1/h"},
        "hello": {"from_node": "mallory@grid", "revoked": ["some-message-id"]},  # mingle's sync: it revokes too
        "shutdown": {},
    }
    senders = {
        "unsigned": make_app(cfg).control,
        "signed by another identity": make_app(cfg, owner=Identity.new()).control,
    }
    signed_elsewhere = sign(identity, f"{cfg.queue_prefix}x", "shutdown", {}, None)  # ours, for another prefix
    for control in senders.values():
        for method, arguments in changes.items():
            control.broadcast(method, arguments=dict(arguments))
    senders["unsigned"].broadcast("shutdown", arguments=signed_elsewhere)
    _synced(cfg, name)
    assert worker.proc.poll() is None
    assert _pool_size(cfg, name) == 1
    queues = [q["name"] for q in (_inspect(cfg, name).active_queues() or {})[name]]
    assert queues == [f"{cfg.queue_prefix}.{cfg.env}"]
    assert (_inspect(cfg, name).revoked() or {})[name] == []
    assert client.submit(sleep_then, 0, "still here").result(timeout=30) == "still here"
    log = worker.text()
    for method in changes:
        assert f"refused remote-control command {method!r}: unsigned" in log
        assert f"refused remote-control command {method!r}: signed by another identity or for another prefix" in log
    assert "Got shutdown from remote" not in log


def _rate_limit(cfg: Config, name: str) -> str:
    return str((_inspect(cfg, name).registered("rate_limit") or {})[name])


def test_a_signed_command_is_obeyed_once_replays_and_tampering_are_refused(
    start_worker: Callable[..., Worker], broker_url: str, settings: dict[str, Any], identity: Identity
) -> None:
    worker = start_worker("--concurrency", "1")
    cfg, name = _cfg(broker_url, settings), _hostname(settings)
    control = make_app(cfg).control  # an unsigned sender: it carries what it captured, as it was signed

    def signed(rate: str, destination: list[str]) -> dict[str, Any]:
        return sign(
            identity, cfg.queue_prefix, "rate_limit", {"task_name": "mqexec.run", "rate_limit": rate}, destination
        )

    slow, fast = signed("1/h", [name]), signed("100/s", [name])
    for captured in (slow, fast):
        control.broadcast("rate_limit", arguments=dict(captured), destination=[name])
    _synced(cfg, name)
    assert _rate_limit(cfg, name) == "['mqexec.run [rate_limit=100/s]']"  # the analyst's signatures: obeyed
    control.broadcast("rate_limit", arguments=dict(slow), destination=[name])  # replayed
    control.broadcast("rate_limit", arguments={**fast, "rate_limit": "1/h"}, destination=[name])  # arguments changed
    elsewhere = signed("1/h", ["someone-else@grid"])
    control.broadcast("rate_limit", arguments=elsewhere, destination=[name])  # its signed destination changed
    _synced(cfg, name)
    assert _rate_limit(cfg, name) == "['mqexec.run [rate_limit=100/s]']"
    log = worker.text()
    assert "refused remote-control command 'rate_limit': replayed" in log
    assert "refused remote-control command 'rate_limit': bad signature" in log


def test_flowers_read_only_inspection_works_unsigned_and_tells_no_secret(
    start_worker: Callable[..., Worker],
    client: mqexec.Client,
    broker_url: str,
    settings: dict[str, Any],
    identity: Identity,
) -> None:
    start_worker("--concurrency", "1")
    assert client.submit(sleep_then, 0, 1).result(timeout=30) == 1
    cfg, name = _cfg(broker_url, settings), _hostname(settings)
    inspect = _inspect(cfg, name)
    replies = {
        method: getattr(inspect, method)()
        for method in ("ping", "stats", "active", "reserved", "scheduled", "registered", "active_queues", "revoked")
    }
    replies["conf"] = inspect.conf()
    replies["report"] = inspect.report()
    assert all(name in (reply or {}) for reply in replies.values()), replies
    assert replies["stats"][name]["mqexec"]["taken"] == 1
    assert "mqexec.run" in replies["registered"][name]
    text = json.dumps(replies)
    for secret in (identity.text(), identity.trust.token(), "guest:guest@"):
        assert secret not in text
    assert "password" not in json.dumps(replies["stats"])


def test_the_owners_signed_stop_works(
    start_worker: Callable[..., Worker], broker_url: str, settings: dict[str, Any]
) -> None:
    worker = start_worker("--concurrency", "1")
    cfg, name = _cfg(broker_url, settings), _hostname(settings)
    assert stop_workers(cfg, hostnames=[name]) == [name]
    assert worker.proc.wait(30) == 0


def test_cancel_affects_only_the_calling_clients_tasks(
    start_worker: Callable[..., Worker],
    broker_url: str,
    settings: dict[str, Any],
    other_prefix: Callable[[], str],  # noqa: F811 - the fixture imported above
) -> None:
    """Two projects (other prefix, other identity) submit the identical pure call — the same key — while their
    workers are busy; one cancels it: the other's completes."""
    theirs = Identity.new()
    b_settings = {**settings, "queue_prefix": other_prefix(), "identity": theirs.text()}
    start_worker("--concurrency", "1")
    start_worker(
        "--concurrency", "1", env={"MQEXEC_QUEUE_PREFIX": b_settings["queue_prefix"]}, secret=theirs.trust.token()
    )
    with mqexec.Client(broker_url, **settings) as a, mqexec.Client(broker_url, **b_settings) as b:
        busy = [c.submit(sleep_then, 2.0, "busy", pure=False) for c in (a, b)]
        mine, other = a.submit(sleep_then, 0.1, "same"), b.submit(sleep_then, 0.1, "same")
        assert mine.key == other.key
        sent_message(a, mine.key)
        sent_message(b, other.key)
        assert a.cancel([mine]) is True
        assert other.result(timeout=30) == "same"
        assert mine.cancelled()
        assert [f.result(timeout=30) for f in busy] == ["busy", "busy"]
