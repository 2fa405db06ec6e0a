"""Issue 10, point 5: a least-privilege broker account per analysis (``mqexec broker grant``), on private nodes.

An analysis's account runs a whole round trip — client, worker, blobs, cancel, remote control, events — with
only the permissions :func:`mqexec.accounts.permissions` gives; another analysis's account on the same vhost is
refused (ACCESS_REFUSED) when it tries to read the results queue, take or publish tasks through the exchange, bind
to the exchanges, declare or delete the queues, send remote control, or publish into the queues by name through
the default exchange (mqexec sends nothing through it, so no account needs to write there); a vhost per analysis
shuts it out entirely.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import amqp
import pytest
from rabbit import PrivateNode
from test_security import sleep_then
from workerproc import ROOT, Worker

import mqexec
from mqexec import accounts
from mqexec.app import make_app
from mqexec.config import Config
from mqexec.control import stop_workers
from mqexec.errors import BrokerError, ConfigError, MQExecError
from mqexec.keys import Identity
from mqexec.topology import blob_queue_name, results_queue_name, task_queue_name


def mqexec_cli(argv: list[str]) -> int:
    """``mqexec <argv>`` with only the ``broker`` commands registered (what ``mqexec.cli`` adds to its parser)."""
    parser = argparse.ArgumentParser(prog="mqexec")
    accounts.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.run(args))


# -- the regexes, against the names the code really uses ----------------------------------------------------------


def names_of(prefix: str) -> dict[str, list[str]]:
    """Every exchange and queue name a prefix's client, workers, remote control and events use, asked of the
    objects that make them (topology, Celery's mailbox and event receiver)."""
    cfg = Config.load(broker_url="amqp://u:p@h//", queue_prefix=prefix, resources="GPU=1")
    app = make_app(cfg)
    mailbox = app.control.mailbox
    receiver = app.events.Receiver(None, handlers={})
    return {
        "exchanges": [
            prefix,
            f"{prefix}.dlx",
            mailbox.exchange.name,
            mailbox.reply_exchange.name,
            app.conf.event_exchange,
        ],
        "queues": [
            task_queue_name(cfg),
            task_queue_name(cfg, "GPU"),
            results_queue_name(cfg, uuid.uuid4().hex[:16]),
            blob_queue_name(cfg, "ab" * 32),
            blob_queue_name(cfg, "ab" * 32, 3),
            f"{prefix}.dead",
            f"{prefix}.boot.{uuid.uuid4().hex[:8]}",
            mailbox.get_queue("mqexec-py3.11-1234@wn042.example.org").name,
            mailbox.get_reply_queue().name,
            receiver.queue.name,
        ],
    }


def test_permissions_cover_the_prefixs_names_and_no_one_elses() -> None:
    perms = accounts.permissions("ana")
    mine = [n for names in names_of("ana").values() for n in names]
    theirs = [n for names in names_of("bob").values() for n in names] + [
        "ana-2.py3.11",
        "anax.results.1",
        "reply.bob.pidbox",
        "celery.pidbox",
        "amq.direct",
    ]
    for kind, regex in perms.items():
        assert all(re.fullmatch(regex, n) for n in mine), (kind, [n for n in mine if not re.fullmatch(regex, n)])
        assert not any(re.fullmatch(regex, n) for n in theirs), (kind, [n for n in theirs if re.fullmatch(regex, n)])
    assert not re.fullmatch(perms["write"], "amq.default") and not re.fullmatch(perms["read"], "amq.default")


@pytest.mark.parametrize(
    ("prefix", "why"),
    [("reply", "other analyses' reply exchanges"), ("amq", "RabbitMQ's amq"), ("a.b", "letters, digits")],
)
def test_a_prefix_that_would_reach_beyond_itself_is_refused(
    prefix: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)):
        mqexec_cli(["broker", "grant", "--prefix", prefix, "--user", "u"])
    assert capsys.readouterr().out == ""


# -- on a private node ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node() -> Iterator[PrivateNode]:
    """A private node with the management API (guest is its administrator); removed after the module."""
    node = PrivateNode(management=True).start()
    try:
        yield node
    finally:
        node.remove()


def _management(node: PrivateNode) -> str:
    return f"http://127.0.0.1:{node.management_port}"


def grant(node: PrivateNode, prefix: str, user: str, vhost: str, capsys: Any, monkeypatch: Any) -> str:
    """``mqexec broker grant`` through the management API; the new account's broker URL."""
    monkeypatch.setenv("MQEXEC_RABBITMQ_ADMIN_PASSWORD", "guest")
    argv = ["broker", "grant", "--prefix", prefix, "--user", user, "--vhost", vhost]
    assert mqexec_cli([*argv, "--management-url", _management(node), "--management-user", "guest"]) == 0
    out = capsys.readouterr().out
    password = re.search(r"its password \(shown once\): (\S+)", out)
    assert password, out
    assert f"write {accounts.permissions(prefix)['write']}" in out
    return node.url(user, password.group(1), vhost)


def two_analyses(node: PrivateNode, n: int, vhosts: tuple[str, str], capsys: Any, monkeypatch: Any) -> tuple[str, str]:
    """Accounts for analyses ``ana<n>`` and ``bob<n>`` (prefix = user name) on the given vhosts: their URLs."""
    return (
        grant(node, f"ana{n}", f"ana{n}", vhosts[0], capsys, monkeypatch),
        grant(node, f"bob{n}", f"bob{n}", vhosts[1], capsys, monkeypatch),
    )


def test_the_printed_commands_are_what_rabbitmqctl_takes(node: PrivateNode, capsys: pytest.CaptureFixture[str]) -> None:
    assert mqexec_cli(["broker", "grant", "--prefix", "printed", "--user", "printed", "--vhost", "pv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [shlex.split(line)[1] for line in lines] == ["add_vhost", "add_user", "set_permissions"]
    node.ctl(*shlex.split(lines[0])[1:])
    node.add_user("printed", "pw")  # `rabbitmqctl add_user printed` asks for this password
    node.ctl(*shlex.split(lines[2])[1:])
    listed = json.loads(node.ctl("-q", "list_user_permissions", "printed", "--formatter", "json"))
    assert listed == [{"vhost": "pv", **accounts.permissions("printed")}]


@pytest.fixture
def worker_of(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """``worker_of(url, prefix, identity)`` → a ready ``mqexec worker`` logged in with that URL; stopped after."""
    workers: list[Worker] = []

    def start(url: str, prefix: str, identity: Identity) -> Worker:
        env = {
            **os.environ,
            "MQEXEC_QUEUE_PREFIX": prefix,
            "MQEXEC_SECRET": identity.trust.token(),
            "MQEXEC_CACHE_DIR": str(tmp_path / f"{prefix}-worker-cache"),
            "MQEXEC_LEASE_INTERVAL": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        }
        hostname = f"w{len(workers)}-{prefix}@test"
        worker = Worker(
            ["--broker", url, "--hostname", hostname, "--concurrency", "1"], env, tmp_path / f"{hostname}.log"
        )
        workers.append(worker)
        return worker.wait_ready()

    yield start
    for worker in workers:
        worker.stop()


def _client(url: str, prefix: str, identity: Identity, tmp_path: Path) -> mqexec.Client:
    return mqexec.Client(
        url,
        queue_prefix=prefix,
        identity=identity.text(),
        cache_dir=str(tmp_path / f"{prefix}-client-cache"),
        no_worker_grace=10.0,
        lease_interval=1.0,
        lease_timeout=5.0,
    )


def test_an_analysis_account_runs_everything_with_only_its_permissions(
    node: PrivateNode,
    worker_of: Callable[..., Worker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    me = Identity.new()
    url = grant(node, "ana", "ana", "shared", capsys, monkeypatch)
    worker_of(url, "ana", me)
    with _client(url, "ana", me, tmp_path) as client:
        assert client.gather(client.map(sleep_then, [0] * 20, range(20))) == list(range(20))
        big = client.scatter(b"x" * 200_000)  # over arg_inline_limit: a blob queue
        assert client.submit(len, big).result(timeout=30) == 200_000
        blocker = client.submit(sleep_then, 1.0, "blocker", pure=False)
        doomed = client.submit(sleep_then, 0, "doomed", pure=False)
        assert client.cancel([doomed]) is True and blocker.result(timeout=30) == "blocker"
        app = make_app(client.config)
        assert app.control.inspect(timeout=5).ping() == {"w0-ana@test": {"ok": "pong"}}
        events: list[str] = []
        with app.connection_for_read() as conn:
            app.events.Receiver(conn, handlers={"*": lambda e: events.append(e["type"])}).capture(limit=3, timeout=10)
        assert "worker-heartbeat" in events
        assert stop_workers(client.config, hostnames=["w0-ana@test"]) == ["w0-ana@test"]


def _refused(url: str, attempt: Callable[[Any], Any]) -> str:
    """Run ``attempt(channel)`` on a connection of ``url`` (with publisher confirms); what the broker said."""
    parts = re.match(r"amqp://([^:]+):([^@]+)@([^/]+)/(.*)", url)
    assert parts
    vhost = parts.group(4) or "/"
    conn = amqp.Connection(
        parts.group(3), userid=parts.group(1), password=parts.group(2), virtual_host=vhost, confirm_publish=True
    )
    try:
        conn.connect()
        attempt(conn.channel())
    except (amqp.exceptions.AccessRefused, amqp.exceptions.NotAllowed) as exc:
        return str(exc.reply_text)  # "ACCESS_REFUSED - access to queue '...' in vhost '...' refused for user '...'"
    finally:
        conn.collect()
    return "allowed"


def _publish(exchange: str, routing_key: str) -> Callable[[Any], Any]:
    return lambda ch: ch.basic_publish(
        amqp.Message(b'[["forged"], {}, {}]'), exchange=exchange, routing_key=routing_key
    )


def _attacks(ana: mqexec.Client, mine: str) -> dict[str, Callable[[Any], Any]]:
    """What the account of prefix ``mine`` tries on analysis ``ana``'s objects (its own queues to spy with)."""
    prefix, results, tasks = ana.config.queue_prefix, ana.reply_to, task_queue_name(ana.config)
    return {
        "read its results": lambda ch: ch.basic_get(results),
        "consume its results": lambda ch: ch.basic_consume(results, callback=print),
        "take its tasks": lambda ch: ch.basic_get(tasks),
        "publish through its task exchange": _publish(prefix, tasks),
        "bind a spy queue to its task exchange": lambda ch: (
            ch.queue_declare(f"{mine}.spy", auto_delete=True),
            ch.queue_bind(f"{mine}.spy", prefix, tasks),
        ),
        "bind a spy queue to its events": lambda ch: (
            ch.queue_declare(f"{mine}.ev.spy", auto_delete=True),
            ch.queue_bind(f"{mine}.ev.spy", f"{prefix}.ev", "#"),
        ),
        "declare a queue in its name": lambda ch: ch.queue_declare(f"{prefix}.results.fake"),
        "delete its task queue": lambda ch: ch.queue_delete(tasks),
        "delete its results queue": lambda ch: ch.queue_delete(results),
        "send it remote control": _publish(f"{prefix}.pidbox", ""),
        "listen to its control replies": lambda ch: (
            ch.queue_declare(f"{mine}.spy2", auto_delete=True),
            ch.queue_bind(f"{mine}.spy2", f"reply.{prefix}.pidbox", "x"),
        ),
    }


def test_another_analysis_account_is_refused_everything_on_a_shared_vhost(
    node: PrivateNode,
    worker_of: Callable[..., Worker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    me = Identity.new()
    ana_url, bob_url = two_analyses(node, 2, ("shared", "shared"), capsys, monkeypatch)
    worker_of(ana_url, "ana2", me)
    with _client(ana_url, "ana2", me, tmp_path) as ana:
        assert ana.submit(sleep_then, 0, "ok").result(timeout=30) == "ok"
        outcomes = {name: _refused(bob_url, attack) for name, attack in _attacks(ana, "bob2").items()}
        anas = r"ACCESS_REFUSED - access to (queue|exchange) '(ana2(\.[^']*)?|reply\.ana2\.pidbox)' in vhost "
        refused = {n: bool(re.match(anas + r"'shared' refused for user 'bob2'$", o)) for n, o in outcomes.items()}
        assert refused == dict.fromkeys(outcomes, True), outcomes  # each refused on ana2's object, not bob2's
        assert ana.submit(sleep_then, 0, "still ok").result(timeout=30) == "still ok"


def test_another_analysis_account_cannot_publish_into_its_queues_by_name(
    node: PrivateNode, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    me = Identity.new()
    ana_url, bob_url = two_analyses(node, 3, ("shared", "shared"), capsys, monkeypatch)
    with _client(ana_url, "ana3", me, tmp_path) as ana:
        for queue in (task_queue_name(ana.config), ana.reply_to):
            assert _refused(bob_url, _publish("", queue)).startswith("ACCESS_REFUSED"), queue


def test_a_vhost_per_analysis_shuts_another_account_out(
    node: PrivateNode,
    worker_of: Callable[..., Worker],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    me = Identity.new()
    ana_url, bob_url = two_analyses(node, 4, ("ana4-vhost", "bob4-vhost"), capsys, monkeypatch)
    worker_of(ana_url, "ana4", me)
    with _client(ana_url, "ana4", me, tmp_path) as ana:
        assert ana.submit(sleep_then, 0, "ok").result(timeout=30) == "ok"
        into_anas = bob_url.rsplit("/", 1)[0] + "/ana4-vhost"
        said = _refused(into_anas, _publish("", task_queue_name(ana.config)))
        assert said.startswith("NOT_ALLOWED") and "access to vhost 'ana4-vhost' refused for user 'bob4'" in said


def test_grant_errors_are_one_sentence_without_the_password(
    node: PrivateNode, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MQEXEC_RABBITMQ_ADMIN_PASSWORD", "not-the-password")
    argv = ["broker", "grant", "--prefix", "x", "--user", "x", "--management-user", "guest"]
    with pytest.raises(BrokerError) as info:
        mqexec_cli([*argv, "--management-url", _management(node)])
    assert "refused the admin user 'guest': wrong user name or password" in str(info.value)
    assert "not-the-password" not in str(info.value)
    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"cannot reach the RabbitMQ management API at http://127\.0\.0\.1:1"):
        mqexec_cli([*argv, "--management-url", "http://127.0.0.1:1"])
    assert time.monotonic() - started < 15
    with pytest.raises(ConfigError, match="http"):
        mqexec_cli([*argv, "--management-url", "amqp://127.0.0.1:5672"])
    assert capsys.readouterr().out == ""
    assert issubclass(BrokerError, MQExecError)  # so mqexec.cli.main prints it as one line, exit 2
