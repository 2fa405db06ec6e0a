"""The client's one thread that talks to the broker: it sends, it receives, it notices what went wrong.

    user threads ── Client.submit ──▶ Ledger outbox ──wake──┐
                                                             ▼
    Courier thread:  out-connection (publisher confirms, pipelined)  ──▶ blob queues, task queues
                     in-connection  (consumer of P.results.<session>) ◀── leases, pieces, results, dead letters
                     every tick: heartbeats · lapsed leases → resend · released handles → forget ·
                                 no worker for this environment? → NoWorkerError · embedded workers alive?

Nothing here blocks a user thread: ``submit`` returns as soon as the call is in the ledger, and many calls go
out back to back before their confirmations are awaited. A silent peer (a NAT dropped the connection) is found by
AMQP heartbeats within about two intervals; then both connections are rebuilt, unconfirmed messages are sent
again, and so is every task a worker skipped while the client was away (a worker that takes the client for gone
leaves a "skipped" note in its results queue) — or, if that queue expired meanwhile, every task no worker holds.
Calls that cannot be sent for ``publish_timeout`` fail with :class:`BrokerError` and are forgotten, so the same
call submitted again runs.

One piece because: every branch here runs on the one thread that owns both connections — sending, receiving,
reconnecting and resending must see the same outbox and the same unconfirmed messages without locks between
them; what it decides with (leases, attempts, dependencies) is in ``ledger.py``, what it sends in ``wire.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from .blobs import piece_count, pieces
from .broker import connect, drop, redact, refused_size
from .errors import BrokerError, SignatureError, TaskDeadLettered
from .futures import Lazy
from .ledger import CallRecord, Ledger, MessageRecord
from .remote import rebuild
from .topology import (
    BROKER_DELIVERY_LIMIT,
    REPLY_HEADER,
    TASK_NAME,
    blob_queue,
    blob_queue_names,
    declare_dead_queue,
    results_queue,
    task_queue,
)
from .wire import PYTHON, Call, Frame, Key, Outcome, Ref, Task, key_from_json, outcomes_of, sha256

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("mqexec.client")
_TICK = 0.25
_BEAT_EVERY = 0.1  #: check the connections' heartbeats this often (py-amqp asks for about once a second)
_ACK_EVERY = 0.02  #: acknowledge results at most this often ...
_ACK_MANY = 128  #: ... or once this many are taken (of the 256 the broker may deliver unacknowledged)
_FAST_CALL = 0.02  #: a function whose calls take less than this (on average) counts as fast ...
_COALESCE_FROM = 8  #: ... and from this many of its single calls waiting at once, they go in shared messages
_COALESCE_MAX = 50  #: of at most this many calls


class Courier(threading.Thread):
    """The broker side of one :class:`~mqexec.client.Client` (see the module docstring)."""

    def __init__(self, client: Client) -> None:
        super().__init__(name=f"mqexec-courier-{client.session}", daemon=True)
        self.client = client
        self.cfg = client.config
        self.ledger: Ledger = client._ledger
        self.session = client.session
        self.identity = client._identity
        self.result_key = self.identity.trust.result_key(self.session)
        self.reply_to = client.reply_to
        self._stop_event = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._puts: list[tuple[str, bytes]] = []  # blobs to put, from user threads
        self._puts_lock = threading.Lock()
        self.blobs: dict[str, int] = {}  # digest → pieces (0: one message), of blobs put on the broker
        self._blob_data: dict[str, bytes] = {}
        self._in: Any = None
        self._out: Any = None
        self._channel: Any = None
        self._consumer: Any = None
        self._tag = 0
        self._unconfirmed: dict[int, str] = {}  # delivery tag → message id (or "blob:<digest>")
        self._declared: set[str | None] = set()
        self._pieces: dict[tuple[str, Key], dict[int, bytes]] = {}
        self._app = client._app
        self.last_ok = time.monotonic()
        self.last_progress = time.monotonic()
        self._last_check = 0.0
        self._last_keepalive = time.monotonic()
        self._diagnosing = False
        self._outage = ""
        self._deaths_seen = 0
        self._connected = False  #: connected before (a connect is a reconnect)
        self._to_ack: Any = None  # the last message taken from the results queue, not yet acknowledged
        self._to_ack_since = 0.0  # when the oldest message not yet acknowledged was taken
        self._unacked = 0
        self._last_beat = 0.0  # when the heartbeats were last checked
        self._undrained: list[Any] = []  # connections whose last drain stopped before the end
        self._fast: dict[str, float] = {}  # function hash → its calls' average time on the workers (s)
        self._max_message: int | None = None  # the broker's max_message_size, once it refused a blob piece
        self._refused_queues: list[str] = []  # the queues of blobs the broker refused, for close() to delete

    # -- life cycle ---------------------------------------------------------------------------------------------

    def connect_first(self) -> None:
        """Connect in the caller's thread: a wrong broker is a :class:`BrokerError` from ``Client(...)``."""
        self._connect()

    def run(self) -> None:
        backoff = 0.2
        while not self._stop_event.is_set():
            try:
                if self._in is None:
                    self._connect()
                    backoff = 0.2
                while not self._stop_event.is_set():
                    self._tick()
            except Exception as exc:
                if self._stop_event.is_set():
                    break
                self._lost(exc)
                limit = refused_size(exc)
                if limit is not None:
                    self._refuse_big_blobs(limit)
                self._fail_unsendable()  # right after a failed attempt: never a call the next attempt could send
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                self._housekeeping()
        self._disconnect()

    def stop(self) -> None:
        self._stop_event.set()
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def put_blob(self, data: bytes, digest: str | None = None) -> Ref:
        """Ship ``data`` once (from any thread); it goes out before any task sent after this call."""
        digest = digest or sha256(data)
        if self._max_message is not None and min(len(data), self.cfg.piece_size) > self._max_message:
            raise self._too_large(self._max_message)
        parts = piece_count(len(data), self.cfg.piece_size)
        with self._puts_lock:
            if digest not in self.blobs and digest not in self._blob_data:
                self._blob_data[digest] = data
                self._puts.append((digest, data))
        self.wake()
        return Ref(blob=digest, size=len(data), pieces=parts)

    def _too_large(self, limit: int) -> BrokerError:
        return BrokerError(
            f"the broker refuses messages over {limit} bytes (its max_message_size), and piece_size is "
            f"{self.cfg.piece_size}: set piece_size (MQEXEC_PIECE_SIZE) below {limit}"
        )

    def _refuse_big_blobs(self, limit: int) -> None:
        """The broker refused a blob piece as larger than its ``max_message_size``: the calls that need a blob cut
        in pieces that large fail (and are forgotten), saying so, instead of being sent again for ever; later ones
        fail at submit (:meth:`put_blob`)."""
        self._max_message = limit
        with self._puts_lock:
            big = {d for d, data in self._blob_data.items() if min(len(data), self.cfg.piece_size) > limit}
            self._puts = [(d, data) for d, data in self._puts if d not in big]
            for digest in big:  # their queues were declared before the broker refused the message: close deletes them
                parts = piece_count(len(self._blob_data.pop(digest)), self.cfg.piece_size)
                self._refused_queues += blob_queue_names(self.cfg, digest, parts)
                self.blobs.pop(digest, None)
        self._unconfirmed = {t: m for t, m in self._unconfirmed.items() if m.removeprefix("blob:") not in big}
        values = self.ledger.values

        def needs_big(c: CallRecord) -> bool:
            refs = [c.args, c.fn.ref, c.fn.code, *(values.get(k) for k in c.deps)]
            return any(r is not None and r.blob in big for r in refs)

        n = self.ledger.fail_all(needs_big, self._too_large(limit), forget=True)
        log.error("%d call(s) failed: %s", n, self._too_large(limit))

    def blob_queues(self) -> list[str]:
        """The queues of every blob this session put or is about to put again (after a reconnect, a blob whose
        confirm had not come yet waits in the puts although its queue may well be on the broker)."""
        with self._puts_lock:
            waiting = [(d, piece_count(len(data), self.cfg.piece_size)) for d, data in self._puts]
        names = [n for d, parts in [*self.blobs.items(), *waiting] for n in blob_queue_names(self.cfg, d, parts)]
        return names + self._refused_queues

    def blob_bytes(self, ref: Ref) -> bytes:
        """The bytes of a blob this client put (to run a call again locally)."""
        assert ref.blob is not None
        return self._blob_data[ref.blob]

    # -- connections -------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        gap = time.monotonic() - self.last_ok
        heartbeat = self.cfg.heartbeat if self.cfg.transport.heartbeats else 0
        self._in = connect(self.cfg, heartbeat=heartbeat)
        try:
            self._out = connect(self.cfg, heartbeat=heartbeat)
            self._channel = self._out.default_channel
            if self.cfg.transport.confirms:
                self._channel.confirm_select()
                self._channel.events["basic_ack"].add(self._on_ack)
                self._channel.events["basic_nack"].add(self._on_nack)
            self._tag = 0
            channel = self._in.default_channel
            why = declare_dead_queue(self._in, self.cfg) if self.cfg.transport.quorum else ""
            if why:
                log.debug("no dead-letter queue for people to look at: %s", why)
            expired = self._connected and self.cfg.transport.quorum and self._results_queue_expired()
            queue = results_queue(self.cfg, self.session)(channel)
            queue.declare()
            from kombu import Consumer

            self._consumer = Consumer(
                channel, queues=[queue], on_message=self._on_message, prefetch_count=256, no_ack=False
            )
            self._consumer.consume()
        except Exception:
            self._disconnect(graceful=False)
            raise
        self._declared.clear()
        if self._outage:
            log.warning("client %s reconnected to the broker after %.1f s", self.session, gap)
            self._outage = ""
        self.last_ok = time.monotonic()
        self._connected = True
        self._after_reconnect(expired)

    def _results_queue_expired(self) -> bool:
        """Whether the broker deleted this session's results queue while the client was away (``session_expire``)."""
        from amqp.exceptions import NotFound

        channel = self._in.channel()
        try:
            channel.queue_declare(queue=self.reply_to, passive=True)
        except NotFound:
            return True
        finally:
            with contextlib.suppress(Exception):
                channel.close()
        return False

    def _after_reconnect(self, expired: bool) -> None:
        """Send again what may not have reached the broker; if the results queue expired meanwhile (with the
        workers' "skipped" notes in it), every task no worker holds."""
        for mid in list(self._unconfirmed.values()):
            if mid.startswith("blob:"):
                digest = mid[5:]
                with self._puts_lock:
                    self.blobs.pop(digest, None)
                    self._puts.insert(0, (digest, self._blob_data[digest]))
            else:
                self.ledger.resend(mid, died=False, why="unconfirmed when the connection was lost")
        self._unconfirmed.clear()
        self.ledger.extend_leases(time.monotonic())
        if expired:
            for m in self.ledger.in_flight():
                if m.lease_until is None:
                    self.ledger.resend(m.id, died=False, why="the client was gone longer than session_expire")

    def _disconnect(self, *, graceful: bool = True) -> None:
        """Close both connections; after a failure without the close handshake (the broker may be silently gone)."""
        if graceful:
            with contextlib.suppress(Exception):
                self._ack_due(now=True)
        for conn in (self._in, self._out):
            if conn is not None and graceful:
                with contextlib.suppress(Exception):
                    conn.release()
            drop(conn)
        self._in = self._out = self._channel = self._consumer = self._to_ack = None
        self._unacked, self._undrained = 0, []

    def _lost(self, exc: BaseException) -> None:
        text = redact(f"{type(exc).__name__}: {exc}")
        if not self._outage:
            log.warning("client %s lost the broker (%s); reconnecting", self.session, text)
        elif text != self._outage:
            log.warning("client %s still cannot reconnect: %s", self.session, text)
        self._outage = text
        self._disconnect(graceful=False)

    # -- the loop ----------------------------------------------------------------------------------------------

    def _tick(self) -> None:
        busy = self.ledger.has_outbox() or bool(self._puts)
        ready = self._wait(0.0 if busy else self._ack_wait())
        self._undrained = [conn for conn in ready if not self._drain(conn)]
        self._ack_due()
        self._send_blobs()
        self._send_outbox()
        now = time.monotonic()
        if self.cfg.transport.heartbeats and now - self._last_beat >= _BEAT_EVERY:
            self._last_beat = now
            self._in.heartbeat_check(rate=2)
            self._out.heartbeat_check(rate=2)
        self.last_ok = now
        self._housekeeping()

    def _wait(self, timeout: float) -> list[Any]:
        """Sleep until a connection has something to read or a user thread wakes us (at most ``timeout``); the
        connections to drain."""
        if not self.cfg.transport.heartbeats:  # the file transport: poll (it polls every 10 ms anyway)
            if timeout:
                select.select([self._wake_r], [], [], 0.005)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            return [self._in, self._out] if self.cfg.transport.confirms else [self._in]
        if self._undrained:  # the last drain stopped before the end
            return self._undrained
        conns = {self._in.connection.sock: self._in, self._out.connection.sock: self._out}
        pending = [c for s, c in conns.items() if getattr(s, "pending", lambda: 0)()]  # TLS: decrypted, buffered
        if pending:
            return pending
        ready, _, _ = select.select([*conns, self._wake_r], [], [], timeout)
        if self._wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
        return [conns[s] for s in ready if s in conns]

    def _drain(self, conn: Any) -> bool:
        """Handle what ``conn`` has to read; False if it stopped before the end (the next tick goes on)."""
        for _ in range(10_000):
            try:
                conn.drain_events(timeout=0)
            except (TimeoutError, BlockingIOError):
                return True
        return False

    def _ack_wait(self) -> float:
        """How long the loop may sleep: a tick, or until the results taken are due to be acknowledged."""
        if self._to_ack is None:
            return _TICK
        return max(0.0, min(_TICK, self._to_ack_since + _ACK_EVERY - time.monotonic()))

    def _ack_due(self, now: bool = False) -> None:
        """Acknowledge what was taken from the results queue — all of it in one ``multiple`` ack, at most every
        ``_ACK_EVERY`` (or every ``_ACK_MANY`` messages). Each ack is a write to the quorum queue's log: acking
        every message at once, the ack of a task's "held" note landed as its result was being written and made it
        wait (docs/benchmarks.md, "Where a round trip goes"). A message taken but not acknowledged when the
        connection drops comes again; results settle once per key and notes are idempotent."""
        if self._to_ack is None:
            return
        if now or self._unacked >= _ACK_MANY or time.monotonic() - self._to_ack_since >= _ACK_EVERY:
            message, self._to_ack, self._unacked = self._to_ack, None, 0
            message.ack(multiple=True)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_check < _TICK:
            return
        self._last_check = now
        self.ledger.purge()
        for mid in self.ledger.lapsed(now) if self._in is not None else ():  # away: the workers cannot be heard
            m = self.ledger.messages.get(mid)
            who = m.worker if m else "?"
            self.ledger.counts["lapsed"] += 1
            self.ledger.resend(
                mid, died=True, why=f"its worker {who} stopped renewing its lease for {self.cfg.lease_timeout:g} s"
            )
        if self.client._local is not None:
            self._supervise_local()
        elif self.ledger.busy() and now - self.last_progress > self.cfg.no_worker_grace and not self._diagnosing:
            self.last_progress = now
            self._diagnosing = True
            threading.Thread(target=self._diagnose, name="mqexec-diagnose", daemon=True).start()
        if self._in is not None and now - self._last_keepalive > self.cfg.session_expire / 4:
            self._last_keepalive = now
            self._keep_blobs()

    def _diagnose(self) -> None:
        from .diagnose import no_worker

        try:
            no_worker(self.cfg, self.ledger, self._app)
        except Exception as exc:  # a diagnosis must never hurt the run
            log.debug("worker check failed: %s", exc)
        finally:
            self._diagnosing = False

    def _supervise_local(self) -> None:
        local = self.client._local
        assert local is not None
        deaths, problem = local.supervise()
        if problem:
            from .errors import NoWorkerError

            self.ledger.fail_all(lambda c: True, NoWorkerError(problem))
            return
        dead, self._deaths_seen = deaths[self._deaths_seen :], len(deaths)
        for name in dead:
            for m in self.ledger.in_flight():
                if m.worker == name or m.lease_until is None:
                    self.ledger.resend(m.id, died=m.worker == name, why=f"the local worker {name} died")

    def _fail_unsendable(self) -> None:
        """While the broker is unreachable: calls waiting longer than ``publish_timeout`` (since the broker was last
        reached, and since they were submitted) fail and are forgotten."""
        limit = self.cfg.publish_timeout
        now = time.monotonic()
        since = now - self.last_ok
        if since < limit:
            return
        exc = BrokerError(
            f"the broker {redact(self.cfg.broker_url or '')} has been unreachable for {since:.0f} s "
            f"(publish_timeout {limit:g} s): {self._outage}"
        )
        n = self.ledger.fail_all(lambda c: c.message is None and now - c.submitted >= limit, exc, forget=True)
        if n:
            log.error("%d call(s) failed: %s", n, exc)

    # -- sending ---------------------------------------------------------------------------------------------

    def _publish(self, body: Any, routing_key: str, exchange: str = "", **kwargs: Any) -> None:
        self._channel.basic_publish(
            self._channel.prepare_message(body, **kwargs), exchange=exchange, routing_key=routing_key
        )
        if self.cfg.transport.confirms:
            self._tag += 1

    def _send_blobs(self) -> None:
        """Put the waiting blobs, each taken off the list only once published (a lost connection midway leaves it
        there for the next connection)."""
        while True:
            with self._puts_lock:
                if not self._puts:
                    return
                digest, data = self._puts[0]
            parts = pieces(data, self.cfg.piece_size)
            count = piece_count(len(data), self.cfg.piece_size)
            names = blob_queue_names(self.cfg, digest, count)
            for name, part in zip(names, parts, strict=True):
                queue = blob_queue(self.cfg, name)(self._channel)
                if queue.queue_declare()[1]:  # already there (another session of this analysis put it)
                    continue
                queue.queue_bind()
                self._publish(
                    part,
                    name,
                    exchange=self.cfg.queue_prefix,
                    content_type="application/octet-stream",
                    content_encoding="binary",
                    properties={"delivery_mode": 2},
                )
                if self.cfg.transport.confirms:
                    self._unconfirmed[self._tag] = f"blob:{digest}"
            with self._puts_lock:
                self._puts.pop(0)
                self.blobs[digest] = count

    def _keep_blobs(self) -> None:
        """Redeclare this session's blob queues, so a long idle stretch does not expire them (x-expires); on a
        channel of its own: a blob queue whose cluster node is down cannot be, and that must not stop the rest."""
        channel = self._out.channel()
        try:
            for digest, parts in list(self.blobs.items()):
                for name in blob_queue_names(self.cfg, digest, parts):
                    blob_queue(self.cfg, name)(channel).queue_declare()
        except self._out.channel_errors as exc:
            log.debug("could not keep the blob queues: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def _send_outbox(self) -> None:
        """Send what is ready: the calls of one ``map`` in messages of up to its batch size; single calls (a
        ``submit`` loop) of a function known to be fast — the workers' timings say so — coalesced likewise, so a
        burst of tiny calls does not cost a message each; calls of any other function go one per message (batching
        them could put long calls one after another on one worker)."""
        calls = self.ledger.take_outbox()
        start = 0
        while start < len(calls):
            first = calls[start]
            end = start + 1
            while (
                end < len(calls)
                and calls[end].group == first.group
                and calls[end].fn.hash == first.fn.hash
                and calls[end].resource == first.resource
                and calls[end].batch == first.batch
                and (calls[end].attempts == 0) == (first.attempts == 0)
            ):
                end += 1
            size = first.batch
            fast = self._fast.get(first.fn.hash, 1.0) < _FAST_CALL
            if first.group == 0 and first.attempts == 0 and end - start >= _COALESCE_FROM and fast:  # a call whose
                # worker died goes alone, so one poison call cannot take shared messages down again and again
                size = min(_COALESCE_MAX, max(2, (end - start) // _COALESCE_FROM))
            for i in range(start, end, size):
                self._send(calls[i : min(i + size, end)])
            start = end

    def _timed(self, fn_hash: str, seconds: float) -> None:
        """A call of the function ``fn_hash`` took ``seconds`` on a worker (a moving average per function)."""
        before = self._fast.get(fn_hash)
        self._fast[fn_hash] = seconds if before is None else 0.8 * before + 0.2 * seconds

    def _dep(self, key: Key, ref: Ref) -> Ref:
        """A dependency's value as it travels: big inline values go once as blobs."""
        if ref.data is not None and len(ref.data) > self.cfg.arg_inline_limit:
            ref = self.put_blob(ref.data)
            self._send_blobs()
            with self.ledger.lock:
                if key in self.ledger.values:
                    self.ledger.values[key] = ref
        return ref

    def _send(self, batch: list[CallRecord]) -> None:
        first = batch[0]
        try:
            mid, body, headers, properties = self._message(batch)
        except Exception as exc:  # not the broker's fault: these calls fail, the courier carries on
            log.exception("could not build the task message of %s", first.label)
            keys = {c.key for c in batch}
            self.ledger.fail_all(lambda c: c.key in keys, exc)
            return
        if first.resource not in self._declared:
            task_queue(self.cfg, first.resource)(self._channel).declare()
            self._declared.add(first.resource)
        queue = task_queue(self.cfg, first.resource)
        self._publish(
            body,
            queue.routing_key,
            exchange=self.cfg.queue_prefix,
            content_type="application/json",
            content_encoding="utf-8",
            headers=headers,
            properties=properties,
        )
        self.ledger.sent(MessageRecord(mid, [c.key for c in batch], first.resource, time.monotonic()), batch)
        if self.cfg.transport.confirms:
            self._unconfirmed[self._tag] = mid

    def _message(self, batch: list[CallRecord]) -> tuple[str, bytes, dict[str, Any], dict[str, Any]]:
        """The signed Celery task message of a batch of calls: (id, body, headers, properties)."""
        from kombu.utils.json import dumps

        first = batch[0]
        mid = uuid.uuid4().hex
        calls = tuple(
            Call(c.key, c.label, c.args, tuple((k, self._dep(k, r)) for k, r in self.ledger.deps_of(c)), c.retries)
            for c in batch
        )
        task = Task(
            id=mid,
            prefix=self.cfg.queue_prefix,
            session=self.session,
            key_id=self.identity.trust.key_id,
            nonce=uuid.uuid4().hex,
            expires=time.time() + self.cfg.task_ttl,
            python=PYTHON,
            reply_to=self.reply_to,
            fn=first.fn.ref,
            calls=calls,
            code=first.fn.code,
            lake=self.cfg.lake_url,
            attempt=1 + max(c.attempts for c in batch),
        )
        label = first.label if len(batch) == 1 else f"{len(batch)} calls: {first.label} ..."
        message = self._app.amqp.as_task_v2(
            mid,
            TASK_NAME,
            args=[task.sign(self.identity)],
            kwargs={},
            shadow=first.fn.name,
            argsrepr=label[:200],
            kwargsrepr="{}",
        )
        headers = {**message.headers, REPLY_HEADER: self.reply_to}
        return mid, dumps(message.body), headers, {"delivery_mode": 2, **message.properties}

    def _confirmed(self, tag: int, multiple: bool) -> list[str]:
        done = [t for t in self._unconfirmed if t <= tag] if multiple else [tag]
        return [self._unconfirmed.pop(t) for t in done if t in self._unconfirmed]

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._confirmed(tag, multiple)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        for mid in self._confirmed(tag, multiple):
            exc = BrokerError(f"the broker refused message {mid} of client {self.session} (basic.nack)")
            with self.ledger.lock:
                m = self.ledger.messages.get(mid)
                keys = set(m.keys) if m else set()
            self.ledger.fail_all(lambda c, keys=keys: c.key in keys, exc, forget=True)  # type: ignore[misc]

    # -- receiving --------------------------------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        try:
            if message.content_type == "application/x-mqexec-frame":
                self._on_frame(bytes(message.body))
            else:
                self._on_dead_letter(message)
        except Exception:
            log.exception("could not process a message on %s", self.reply_to)
        if self.cfg.transport.confirms:  # acknowledged with all before it, soon (_ack_due)
            if self._to_ack is None:
                self._to_ack_since = time.monotonic()
            self._to_ack = message
            self._unacked += 1
        else:
            message.ack()  # kombu's virtual transports ignore ``multiple``

    def _on_frame(self, raw: bytes) -> None:
        try:
            frame = Frame.decode(raw, self.result_key)
        except SignatureError as exc:
            log.error("dropped a message on %s, never unpickled: %s", self.reply_to, exc)
            return
        if frame.session != self.session:
            return
        self.last_progress = time.monotonic()
        head = frame.head
        if frame.kind == "lease":
            self.ledger.leased(head.get("held", []), frame.worker, time.monotonic())
            for mid in head.get("released", []):
                self.ledger.resend(mid, died=False, why="its worker stopped before starting it")
            for mid in head.get("skipped", []):
                self.ledger.resend(mid, died=False, why="a worker skipped it while this client was away")
            for mid, why in head.get("lost", []):
                if mid in self.ledger.messages:  # a note delivered again after a reconnect counts once
                    self.ledger.counts["lost"] += 1
                self.ledger.resend(mid, died=True, why=f"on {frame.worker}: {why}")
        elif frame.kind == "piece":
            self._pieces.setdefault((head["msg"], key_from_json(head["k"])), {})[int(head["i"])] = frame.parts[0]
        elif frame.kind == "result":
            mid = str(head.get("msg"))
            outcomes = outcomes_of(frame)
            self.ledger.tally(frame.worker, str(head.get("site") or ""), len(outcomes))
            for outcome in outcomes:
                self._settle(mid, outcome, frame.worker)

    def _settle(self, mid: str, outcome: Outcome, worker: str) -> None:
        """One outcome: each on its own, so a failure here cannot leave its batch-mates pending."""
        try:
            if outcome.ok:
                data, ref = self._value(mid, outcome)
                call = self.ledger.calls.get(outcome.key)
                if call is not None:
                    self._timed(call.fn.hash, outcome.seconds)
                load = self.client._loader(data, ref, call.safe if call is not None else self.cfg.safe_results)
                self.ledger.outcome(mid, outcome.key, lambda s: s.finish(Lazy(load), outcome.type_name), ref)
                return
            if outcome.system == "blob" and self._reput(mid, outcome.key):
                return
            exc = rebuild(outcome.error or {}, worker)
            self.ledger.outcome(mid, outcome.key, lambda s: s.fail(exc), None)
        except Exception as err:
            log.exception("could not settle %s", outcome.key)
            failure: BaseException = err  # (the name ``err`` is gone after the block; the lambda runs inside it)
            self.ledger.outcome(mid, outcome.key, lambda s: s.fail(failure), None)

    def _value(self, mid: str, outcome: Outcome) -> tuple[bytes | None, Ref]:
        if outcome.value is not None:
            return outcome.value, Ref.inline(outcome.value)
        if outcome.lake is not None:
            return None, Ref(lake=outcome.lake, size=int(outcome.lake.get("size", 0)))
        got = self._pieces.pop((mid, outcome.key), {})
        data = b"".join(got[i] for i in range(outcome.pieces) if i in got)
        if len(got) != outcome.pieces or len(data) != outcome.size or sha256(data) != outcome.sha:
            raise BrokerError(
                f"the result of {outcome.key!r} arrived incomplete ({len(got)} of {outcome.pieces} pieces)"
            )
        return data, Ref.inline(data)

    def _reput(self, mid: str, key: Key) -> bool:
        """A worker could not find a blob of this task: put this session's blobs again and resend (3 times)."""
        call = self.ledger.calls.get(key)
        if call is None or call.attempts >= 3:
            return False
        call.attempts += 1
        with self._puts_lock:
            self._puts.extend((d, data) for d, data in self._blob_data.items())
            self.blobs.clear()
        self.ledger.resend(mid, died=False, why="a payload was missing on the broker")
        return True

    def _on_dead_letter(self, message: Any) -> None:
        """A task message the broker gave up on, routed home by the dead-letter exchange."""
        headers = message.headers or {}
        deaths = headers.get("x-death") or [{}]
        reason = deaths[0].get("reason", "?")
        try:
            wire = json.loads(message.body)[0][0]
            task = Task.verify(wire, self.identity.trust)
        except (SignatureError, ValueError, IndexError, KeyError, TypeError):
            log.error("a dead-lettered message that this client did not sign arrived (reason %s): dropped", reason)
            return
        why = {  # x-death's "count" counts dead-letterings, not deliveries: the limit is what is known
            "delivery_limit": f"the broker delivered it more than {BROKER_DELIVERY_LIMIT} times (the task queue's "
            "x-delivery-limit) and no worker kept it (each handed it back, or died while receiving it)",
            "rejected": "a worker refused it as forged, malformed, or signed by another key than the one it trusts "
            "(see the worker's log)",
        }.get(reason, f"dead-lettered by the broker ({reason})")
        self.last_progress = time.monotonic()
        for call in task.calls:
            self.ledger.counts["dead_broker"] += 1
            exc = TaskDeadLettered(f"task {call.label} [{call.key}] could not run: {why}")
            self.ledger.outcome(task.id, call.key, lambda s, exc=exc: s.fail(exc), None)  # type: ignore[misc]
