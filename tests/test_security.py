"""Issue 10, tried as an attacker would: who can make a worker run code, who can answer a client, replays.

Each test publishes what an attacker could — a task signed with what a worker holds, a result frame signed with
another key, a captured task message again, the same message in another prefix's queue — and asserts outcomes:
the marker file a task or a pickle would write is absent, the worker keeps serving, the future settles from the
real worker, the refusal is in the worker's log (once). The control plane is in ``test_security_control.py``,
what a worker's bytes can do on the client in ``test_security_unpickle.py``, broker accounts in
``test_accounts.py``; docs/security.md maps each of them to the threat it answers.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from forge import make_task, publish
from kombu import Connection, Exchange, Queue
from rabbit import TlsBrokers, fixture_rabbit_tls  # noqa: F401 - the rabbit_tls fixture
from workerproc import Worker

import mqexec
from mqexec.config import Config
from mqexec.keys import Identity
from mqexec.topology import delete_topology, task_queue, task_queue_name
from mqexec.wire import Outcome, _canonical, result_frame


def write_line(path: str, text: str = "executed") -> str:
    """The task an attacker wants run: it leaves a line in ``path``."""
    with open(path, "a") as fh:
        fh.write(text + "\n")
    return text


def sleep_then(delay: float, value: Any) -> Any:
    time.sleep(delay)
    return value


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.1)


def _pyamqp(url: str) -> str:
    return url.replace("amqp://", "pyamqp://", 1)


# -- what an attacker on the vhost does: spy, capture, republish, answer ------------------------------------------


@dataclass(frozen=True)
class Captured:
    """A task message exactly as the broker delivered it."""

    body: bytes | str
    headers: dict[str, Any]
    properties: dict[str, Any]


def spy_on_tasks(cfg: Config) -> str:
    """A queue bound to the task exchange with the task queue's routing key: it gets a copy of every task message
    (what someone allowed to read the prefix's exchange could do). Returns its name."""
    name = f"{cfg.queue_prefix}.spy"
    with Connection(_pyamqp(cfg.broker_url or "")) as conn:
        queue = Queue(name, Exchange(cfg.queue_prefix, type="direct", durable=True), routing_key=task_queue_name(cfg))
        queue(conn.default_channel).declare()
    return name


def take(cfg: Config, queue: str, timeout: float = 30.0) -> Captured:
    """The next message of ``queue``."""
    with Connection(_pyamqp(cfg.broker_url or "")) as conn:
        channel = conn.channel()
        deadline = time.monotonic() + timeout
        while (message := channel.basic_get(queue, no_ack=True)) is None:
            assert time.monotonic() < deadline, f"nothing arrived in {queue}"
            time.sleep(0.05)
        props = {k: v for k, v in message.properties.items() if k not in ("application_headers",)}
        return Captured(message.body, dict(message.headers or {}), props)


def republish(cfg: Config, message: Captured, queue_cfg: Config | None = None) -> None:
    """Put a captured task message into the task queue of ``queue_cfg`` (default: ``cfg``'s), unchanged."""
    target = task_queue(queue_cfg or cfg)
    with Connection(_pyamqp(cfg.broker_url or "")) as conn:
        channel = conn.channel()
        target(channel).declare()
        properties = {k: v for k, v in message.properties.items() if k not in ("content_type", "content_encoding")}
        channel.basic_publish(
            channel.prepare_message(
                message.body,
                content_type=message.properties.get("content_type"),
                content_encoding=message.properties.get("content_encoding"),
                headers=message.headers,
                properties=properties,
            ),
            exchange=target.exchange.name,
            routing_key=target.routing_key,
        )


def send_frame(cfg: Config, reply_to: str, raw: bytes) -> None:
    """Publish a worker→client frame into a client's results queue, as a worker (or anyone on the vhost) can."""
    with Connection(_pyamqp(cfg.broker_url or "")) as conn:
        channel = conn.channel()
        channel.basic_publish(
            channel.prepare_message(raw, content_type="application/x-mqexec-frame", content_encoding="binary"),
            exchange="",
            routing_key=reply_to,
        )


def sent_message(client: Any, key: Any, timeout: float = 30.0) -> str:
    """The id of the task message that carries ``key`` (once the client has sent it)."""
    deadline = time.monotonic() + timeout
    while True:
        with client._ledger.lock:
            call = client._ledger.calls.get(key)
            if call is not None and call.message is not None:
                return str(call.message)
        assert time.monotonic() < deadline, f"{key!r} was not sent"
        time.sleep(0.01)  # not a busy loop on the ledger's lock: the courier needs it to send
        time.sleep(0.02)


def outcome_frame(session: str, mid: str, outcome: Outcome, key: bytes, worker: str = "mallory@grid") -> bytes:
    """The result frame of one outcome, signed with ``key``."""
    return result_frame(session, worker, mid, [outcome]).encode(key)


def dead_letters(cfg: Config, expected: int, timeout: float = 30.0) -> list[Any]:
    """Take up to ``expected`` messages from the prefix's dead-letter queue (waiting up to ``timeout``)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    with Connection(_pyamqp(cfg.broker_url or "")) as conn:
        channel = conn.channel()
        while len(got) < expected and time.monotonic() < deadline:
            message = channel.basic_get(f"{cfg.queue_prefix}.dead", no_ack=True)
            if message is None:
                time.sleep(0.1)
            else:
                got.append(message)
    return got


@pytest.fixture
def other_prefix(broker_url: str) -> Iterator[Callable[[], str]]:
    """``other_prefix()`` → a further queue prefix for this test (another project), deleted afterwards."""
    made: list[str] = []

    def make() -> str:
        made.append(f"mqt{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    with Connection(_pyamqp(broker_url)) as conn:
        for name in made:
            delete_topology(conn.channel(), Config.load(broker_url=broker_url, queue_prefix=name))


# -- 1. only the analyst signs tasks ------------------------------------------------------------------------------


def _signed_with(wire: dict[str, Any], signature: bytes) -> dict[str, Any]:
    return {**{k: v for k, v in wire.items() if k != "sig"}, "sig": base64.b64encode(signature).decode()}


def _body(wire: dict[str, Any]) -> bytes:
    return _canonical({k: v for k, v in wire.items() if k != "sig"})


def _hmac(key: bytes, wire: dict[str, Any]) -> bytes:
    return hmac.new(key, _body(wire), "sha256").digest()


def test_what_a_worker_holds_cannot_sign_a_task_any_worker_runs(
    start_worker: Callable[..., Worker],
    client: mqexec.Client,
    settings: dict[str, Any],
    broker_url: str,
    tmp_path: Path,
    identity: Identity,
) -> None:
    """A compromised worker has the token (public key + result secret) and the broker account. Whatever it signs
    with that — or with a key of its own — is dead-lettered unread by a worker that has run the analyst's tasks
    (it knows its key is right); the worker keeps serving its analyst. (A worker whose *first* task is of another
    key hands it back and stops instead: it was given the wrong key — tests/test_faults_results.py, case 6.)"""
    worker = start_worker("--concurrency", "1")
    assert client.submit(sleep_then, 0, "first").result(timeout=30) == "first"
    cfg = Config.load(broker_url=broker_url, **settings)
    marker = tmp_path / "marker"
    token = identity.trust  # exactly what `mqexec key worker` hands a worker
    wire = make_task(identity, cfg, client.session, write_line, str(marker)).sign(identity)
    own = Identity(Identity.new().seed, token.result_secret)  # an Ed25519 key of the worker's own
    mine = Identity.new()  # ... also announced under its own key id
    harmless = make_task(identity, cfg, client.session, sleep_then, 0, 1).sign(identity)
    resigned = {**harmless, "fn": wire["fn"], "calls": wire["calls"]}  # the analyst's task, its code swapped
    attempts = {
        "HMAC with the result secret": _signed_with(wire, _hmac(token.result_secret, wire)),
        "HMAC with the session's result key": _signed_with(wire, _hmac(token.result_key(client.session), wire)),
        "Ed25519 key of its own, our key id": _signed_with(wire, own.sign(_body(wire))),
        "tampered, re-signed with its own key": _signed_with(resigned, own.sign(_body(resigned))),
        "its own key and key id": make_task(mine, cfg, client.session, write_line, str(marker)).sign(mine),
    }
    for forged in attempts.values():
        publish(cfg, forged)
    assert len(dead_letters(cfg, len(attempts))) == len(attempts), "each forged task is dead-lettered"
    assert not marker.exists()
    assert worker.proc.poll() is None, f"a forged task stopped the worker:\n{worker.text()}"
    assert worker.text().count("never unpickled") == len(attempts)
    # the same worker still runs what the analyst signs (and the marker function does write when it runs)
    assert client.submit(write_line, str(tmp_path / "real")).result(timeout=30) == "executed"


def test_results_signed_by_anyone_but_this_sessions_workers_are_dropped_unread(
    start_worker: Callable[..., Worker],
    client: mqexec.Client,
    identity: Identity,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames signed with another session's key, or another identity's, carrying a pickle that would write a
    marker: dropped before anything is read; the future completes from the real worker."""
    start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    future = client.submit(sleep_then, 3.0, 42)
    mid = sent_message(client, future.key)
    value = Outcome(future.key, True, "builtins.int", value=evil_pickle(marker))
    error = Outcome(future.key, False, error={"type": "builtins.ValueError", "args": ["forged"], "str": "forged"})
    keys = {
        "another session's key": identity.trust.result_key("another-session"),
        "another identity's key": Identity.new().trust.result_key(client.session),
    }
    with caplog.at_level("ERROR", logger="mqexec.client"):
        for key in keys.values():
            for outcome in (value, error):
                send_frame(client.config, client.reply_to, outcome_frame(client.session, mid, outcome, key))
        assert future.result(timeout=30) == 42
    assert not marker.exists()
    assert sum("never unpickled" in r.getMessage() for r in caplog.records) == 2 * len(keys)


def test_a_frame_of_one_session_is_refused_by_another(
    start_worker: Callable[..., Worker],
    broker_url: str,
    settings: dict[str, Any],
    identity: Identity,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two sessions of one analyst: a frame signed for session A (what A's workers send) replayed into B's
    results queue is refused — result keys are per session."""
    start_worker("--concurrency", "1")
    with mqexec.Client(broker_url, **settings) as a, mqexec.Client(broker_url, **settings) as b:
        future = b.submit(sleep_then, 2.0, "from b's worker")
        mid = sent_message(b, future.key)
        stolen = Outcome(future.key, True, "builtins.str", value=evil_pickle(tmp_path / "marker"))
        frame = result_frame(b.session, "w@a", mid, [stolen]).encode(identity.trust.result_key(a.session))
        with caplog.at_level("ERROR", logger="mqexec.client"):
            send_frame(b.config, b.reply_to, frame)
            assert future.result(timeout=30) == "from b's worker"
        assert any("bad signature" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "marker").exists()


def evil_pickle(marker: Path) -> bytes:
    """A pickle that writes ``marker`` when loaded with plain ``pickle.loads``."""
    import pickle

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    return pickle.dumps(Evil())


def test_a_worker_logs_a_bounded_number_of_refusal_kinds(caplog: pytest.LogCaptureFixture) -> None:
    """Tasks of other keys are logged once per key id — and key ids are a stranger's to choose: the set of kinds
    logged, and so the log, stay bounded."""
    from mqexec.intake import Gate

    gate = Gate(Config.load(broker_url="amqp://u:p@h//", secret=Identity.new().trust.token()), "w@test")
    with caplog.at_level("WARNING", logger="mqexec.worker"):
        for i in range(5000):
            gate._log_once(f"foreign key {i:016x}", "rejected a task message")
    assert len(caplog.records) == len(gate._logged) == 1000


# -- 3. no replay, no cross-prefix reuse ------------------------------------------------------------------------


def test_a_captured_task_runs_once_and_not_after_its_client_closed(
    other_prefix: Callable[[], str],
    start_worker: Callable[..., Worker],
    broker_url: str,
    settings: dict[str, Any],
    tmp_path: Path,
) -> None:
    cfg = Config.load(broker_url=broker_url, **settings)
    spy = spy_on_tasks(cfg)
    runs = tmp_path / "runs"
    first = start_worker("--concurrency", "1")
    with mqexec.Client(broker_url, **settings) as client:
        assert client.submit(write_line, str(runs), "ran").result(timeout=30) == "ran"
        captured = take(cfg, spy)
        for _ in range(3):
            republish(cfg, captured)
        wait_for(lambda: "a replayed message" in first.text(), "the worker refused the replay")
        time.sleep(1.0)  # the other two copies reach it too
        assert runs.read_text().splitlines() == ["ran"]
        assert first.text().count("a replayed message") == 1, "refused and logged once"
    first.stop()
    fresh = start_worker("--concurrency", "1")  # no memory of the nonce: only "its client is gone" stops it
    republish(cfg, captured)
    wait_for(lambda: "is gone" in fresh.text(), "the fresh worker refused the task of a closed client")
    assert runs.read_text().splitlines() == ["ran"]
    # the same message in another project's queue: same analyst (same key) and another identity
    same_key, other_key = other_prefix(), other_prefix()
    stranger = Identity.new()
    neighbours = {
        same_key: start_worker("--concurrency", "1", env={"MQEXEC_QUEUE_PREFIX": same_key}),
        other_key: start_worker(
            "--concurrency", "1", env={"MQEXEC_QUEUE_PREFIX": other_key}, secret=stranger.trust.token()
        ),
    }
    # the other project's worker has run its own analyst's tasks, so it knows its key is right (a fresh worker whose
    # first task is of another key takes itself for misconfigured and stops: tests/test_faults_results.py, case 6)
    with mqexec.Client(broker_url, **{**settings, "queue_prefix": other_key, "identity": stranger.text()}) as theirs:
        assert theirs.submit(sleep_then, 0, "theirs").result(timeout=30) == "theirs"
    for prefix in neighbours:
        republish(cfg, captured, cfg.replace(queue_prefix=prefix))
    wait_for(lambda: f"for queue prefix {cfg.queue_prefix!r}" in neighbours[same_key].text(), "prefix refusal")
    wait_for(lambda: "never unpickled" in neighbours[other_key].text(), "foreign-key refusal")
    assert runs.read_text().splitlines() == ["ran"]
    assert all(w.proc.poll() is None for w in neighbours.values()), "a stray task stopped a worker"


def test_a_signed_task_in_a_changed_celery_envelope_is_not_run(
    start_worker: Callable[..., Worker], broker_url: str, settings: dict[str, Any], tmp_path: Path
) -> None:
    """The Celery message around the signed task is not signed. Someone holding the analysis's account takes the
    analyst's task off the queue and puts it back asking for more: a callback (the worker would publish it with
    its account), a time limit, an ETA, keyword arguments, another task name or id. Each copy is dead-lettered."""
    cfg = Config.load(broker_url=broker_url, **settings)
    spy = spy_on_tasks(cfg)
    runs = tmp_path / "runs"
    with mqexec.Client(broker_url, **settings) as client:
        client.submit(write_line, str(runs), "ran")
        captured = take(cfg, spy)
        with Connection(_pyamqp(broker_url)) as conn:
            conn.channel().queue_purge(task_queue_name(cfg))  # taken off the queue before any worker saw it
        body = json.loads(captured.body)
        callback = {"task": "celery.accumulate", "args": [], "kwargs": {}, "options": {}, "immutable": False}
        changed: dict[str, tuple[list[Any], dict[str, Any]]] = {
            "callbacks": ([body[0], body[1], {**body[2], "callbacks": [callback]}], {}),
            "keyword arguments": ([body[0], {"extra": 1}, body[2]], {}),
            "time limit": (body, {"timelimit": [1, 1]}),
            "ETA": (body, {"eta": "2000-01-01T00:00:00+00:00"}),
            "another task": (body, {"task": "celery.accumulate"}),
            "another id": (body, {"id": uuid.uuid4().hex}),
        }
        for new_body, headers in changed.values():
            republish(cfg, Captured(json.dumps(new_body), {**captured.headers, **headers}, captured.properties))
        worker = start_worker("--concurrency", "1")
        assert len(dead_letters(cfg, len(changed))) == len(changed)
        assert worker.text().count("Celery envelope changed after it was signed") == len(changed)
        assert not runs.exists()
        assert client.submit(write_line, str(runs), "the analyst's").result(timeout=30) == "the analyst's"
    assert runs.read_text().splitlines() == ["the analyst's"]


def test_an_expired_task_is_not_run(
    start_worker: Callable[..., Worker], client: mqexec.Client, identity: Identity, tmp_path: Path
) -> None:
    worker = start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    expired = make_task(identity, client.config, client.session, write_line, str(marker), expires=time.time() - 1)
    publish(client.config, expired.sign(identity), reply_to=client.reply_to)
    wait_for(lambda: "it expired" in worker.text(), "the worker refused the expired task")
    assert client.submit(write_line, str(tmp_path / "later")).result(timeout=30) == "executed"  # it went on
    assert not marker.exists()


# -- someone on the network -------------------------------------------------------------------------------------


def test_over_amqps_nobody_can_stand_in_for_the_broker(
    rabbit_tls: TlsBrokers, start_worker: Callable[..., Worker], settings: dict[str, Any], tmp_path: Path
) -> None:
    """A client and a worker that trust the broker's CA run a task over TLS; neither talks to a broker whose
    certificate another CA signed, or that the right CA signed for another host (a man in the middle)."""
    pki, url = rabbit_tls.pki, rabbit_tls.node.url(tls=True)
    worker = start_worker("--concurrency", "1", broker=url, env={"MQEXEC_TLS_CA": str(pki.ca)})
    with mqexec.Client(url, **settings, tls_ca=str(pki.ca)) as client:
        assert client.submit(write_line, str(tmp_path / "ran"), "over tls").result(timeout=30) == "over tls"
    impostors = {"another CA": (url, pki.wrong_ca), "another host": (rabbit_tls.wrong_host.url(tls=True), pki.ca)}
    for what, (address, ca) in impostors.items():
        started = time.monotonic()
        with pytest.raises(mqexec.BrokerError, match=r"certificate|TLS|SSL") as info:
            mqexec.Client(address, **settings, tls_ca=str(ca))
        assert time.monotonic() - started < 15, what
        assert "guest:guest" not in str(info.value)
    stranger = start_worker(broker=rabbit_tls.wrong_host.url(tls=True), env={"MQEXEC_TLS_CA": str(pki.ca)}, ready=False)
    assert stranger.proc.wait(30) == 2
    assert "mqexec: error:" in stranger.text() and "guest:guest" not in stranger.text()
    assert worker.proc.poll() is None
