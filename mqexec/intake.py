"""How a worker takes tasks: check, lease, acknowledge — and take no more than it has processes for.

    task queue ──delivery (prefetch 1)──▶ Gate.on_message (worker main process, Celery's event loop)
        1. check: signed by the trusted identity (another key: dead-letter, go on) · for this prefix · not expired ·
           nonce unseen (replay) · not revoked · its client session alive (else skip: the client is gone; a
           "skipped" note waits in its results queue, so that it sends the task again should it come back)
        2. lease note "held [message id]" ──▶ the client's results queue   (before the ack, same channel: a
           message the broker forgets is always one the client knows a worker holds)
        3. full (one task per process; one more each while tasks are short)?  cancel the consumer — no task waits
           here unacknowledged
        4. ack ──▶ Celery's strategy ──▶ Request ──▶ pool process (execute.py)
    every lease_interval: "held [ids]" per client · a pool process died: "lost [id]" · stopping: "released [ids]"
    a task finished ──▶ Request.__init_subclass__ hook ──▶ Gate.finished ──▶ consume again
    connection lost ──▶ Celery drops the tasks no process started ──▶ reconnects ──▶ the gate gives those back
        ("released [ids]"), renews the leases of the running ones at once and consumes again only if not full (a
        blip is not a stop: the running tasks carry on)

Why not Celery's ``acks_late``: an acknowledgement held for a whole task runs into RabbitMQ's
``consumer_timeout`` (the broker closes the channel, the task runs again on the next worker and kills it too)
and turns every connection blip into a rerun. Acknowledging on receipt and leasing the task to the client
(``ledger.py``) keeps at-least-once without either (``docs/design.md``, "Leases").

One piece because: the checks, the lease notes, flow control and the wrong-key policy all act on one delivery in
Celery's event loop, in an order that is the guarantee (lease before ack, ack before the pool); split, that order
would live in no one file. What a task does once taken is ``execute.py``; what the envelope is, ``wire.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request as CeleryRequest
from kombu import Consumer as KombuConsumer
from kombu.common import QoS

from .control import ControlStep_
from .errors import SignatureError
from .topology import TASK_NAME, results_queue_name
from .wire import ForeignKey, Frame, Task

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("mqexec.worker")

_SHORT_TASK = 0.5  #: tasks shorter than this (s, on average) are taken one ahead per process
WRONG_KEY_EXIT = 3  #: exit code of a worker whose first task was signed by an identity it does not trust
_gate: Gate | None = None
_LOGGED_KINDS = 1000  #: refusal kinds logged once each; no more (a stranger's messages name key ids at will)


def current_gate() -> Gate | None:
    """The gate of this worker process (None outside a worker)."""
    return _gate


def dirac_job_id() -> str | None:
    """This worker's DIRAC job id: ``$JOBID`` (DIRAC 9's JobWrapper) or ``$DIRACJOBID`` (DIRAC 8)."""
    return os.environ.get("JOBID") or os.environ.get("DIRACJOBID") or None


@dataclass
class _Held:
    msg: str
    session: str
    reply_to: str
    started: float


@dataclass
class _Session:
    checked: float
    alive: bool
    gone_since: float | None = None


class Gate:
    """The worker's intake (see the module docstring); one per worker process, kept across reconnects."""

    def __init__(self, cfg: Config, hostname: str) -> None:
        self.cfg = cfg
        self.trust = cfg.trust()
        self.hostname = hostname
        self.concurrency = cfg.concurrency
        self._task_seconds = 1.0  # moving average of how long a task stays here; starts "long": no extra task
        self.held: dict[str, _Held] = {}
        self._give_back: list[_Held] = []  # dropped by Celery with a lost connection: "released" once connected
        self.exit_code = 0
        self.taken = 0
        self._nonces: dict[str, float] = {}
        self._sessions: dict[str, _Session] = {}
        self._keys: dict[str, bytes] = {}
        self._logged: set[str] = set()
        self._stopping = ""
        self._paused = False
        self._consumer: Any = None
        self._channel: Any = None
        self._check_conn: Any = None
        self._c: Any = None

    # -- wiring (Tasks step) -------------------------------------------------------------------------------------

    def attach(self, c: Any, consumer: Any) -> None:
        self._c, self._channel = c, consumer.channel
        self._paused = False
        qos: Any = getattr(self._channel, "qos", None)
        if hasattr(qos, "can_consume"):  # a virtual transport (the embedded default) polls: it asks before each fetch
            qos.can_consume = lambda: not self._stopping and len(self.held) < self.capacity
        else:  # AMQP pushes: the consumer is cancelled while full (see _pause) — also after a reconnect
            self._consumer = consumer
            self._paused = len(self.held) >= self.capacity  # then consume() waits for a task to finish
        self._tell(self._give_back, "released")  # after a reconnect: the tasks Celery dropped go back to their clients
        self._give_back = []
        if self.held:  # ... and the clients hear at once that we still hold the others
            self.renew()

    def detach(self) -> None:
        """The worker's connection is gone (or closing): so is the session check's, most likely."""
        from .broker import drop

        self._consumer = self._channel = None
        drop(self._check_conn)
        self._check_conn = None

    # -- a delivery -----------------------------------------------------------------------------------------------

    def on_message(self, message: Any, handler: Any) -> None:
        if self._stopping:
            message.reject(requeue=True)  # delivered before our cancel reached the broker: another worker takes it
            return
        try:
            body = json.loads(message.body)
            wire = body[0][0]
            task = Task.verify(wire, self.trust)
            _check_envelope(task, message.headers or {}, body)
        except ForeignKey as exc:
            self.wrong_key(message, exc, str(wire.get("kid")))
            return
        except (SignatureError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            log.warning("rejected a task message, never unpickled (it goes to the dead-letter queue): %s", exc)
            message.reject(requeue=False)
            return
        why = self._refusal(task, message)
        if not why and not self._session_alive(task.session, task.reply_to):
            why = f"its client (session {task.session}) is gone"
            self._note(task.session, task.reply_to, skipped=[task.id])  # should it come back, it sends it again
        if why:
            self._log_once(why, f"skipped task {task.id}: {why}")
            message.ack()
            return
        self._nonces[task.nonce] = task.expires
        self.held[task.id] = _Held(task.id, task.session, task.reply_to, time.monotonic())
        self.taken += 1
        self._note(task.session, task.reply_to, held=[task.id])
        if self.taken == 1:
            self._first_task()
        if len(self.held) >= self.capacity:
            self._pause()
        message.ack()
        handler(message)
        from celery.worker import state

        if task.id not in state.requests:  # Celery dropped it (undecodable ...): it will not finish, free the slot
            self.finished(task.id)

    def _refusal(self, task: Task, message: Any) -> str:
        from celery.worker import state

        if task.prefix != self.cfg.queue_prefix or task.reply_to != results_queue_name(self.cfg, task.session):
            return f"it is for queue prefix {task.prefix!r}, this worker serves {self.cfg.queue_prefix!r}"
        if task.expires < time.time():
            return "it expired (task_ttl)"
        if task.nonce in self._nonces:
            return "it was delivered here before (a replayed message)"
        if message.headers.get("id") in state.revoked:
            return "it was cancelled"
        return ""

    def wrong_key(self, message: Any, exc: ForeignKey, key_id: str) -> None:
        """A task signed by another identity than the one this worker trusts.

        A worker that has not run a task yet was most likely given the wrong key (a stale ``MQEXEC_SECRET``): it
        hands the task back — a correctly keyed worker runs it, the run loses nothing — and exits with code 3 and
        a sentence saying so. A worker that has run the analyst's tasks already knows its key is right: the task
        is a stranger's and is dead-lettered like a forged one, and the worker carries on (otherwise one such
        task, put into the queue again and again, would stop every worker in turn). Only accounts allowed to
        publish into this prefix's exchange can send one (``accounts.py``; not the JDL's bootstrap account).
        """
        if self.taken == 0:
            message.reject(requeue=True)
            log.error(
                "%s: this worker's key is not the client's — set MQEXEC_SECRET to the output of `mqexec key worker` "
                "on the analyst's machine; the task goes back to the queue and this worker stops",
                exc,
            )
            self.exit_code = WRONG_KEY_EXIT
            self.stop_taking("its key is not the client's")
            os.kill(os.getpid(), signal.SIGTERM)
            return
        message.reject(requeue=False)
        self._log_once(
            f"foreign key {key_id}",
            f"rejected a task message, never unpickled (it goes to the dead-letter queue): {exc}. If this worker "
            "is meant to serve that client, set MQEXEC_SECRET to the output of `mqexec key worker` on the "
            "analyst's machine",
        )

    def _session_alive(self, session: str, queue: str) -> bool:
        """Whether the client of ``session`` is still there: its results queue exists and has had a consumer
        within ``session_grace`` (checked on a connection of our own, cached for 2 s: a client that was gone may
        be back)."""
        if not self.cfg.transport.quorum:
            return True
        now = time.monotonic()
        s = self._sessions.get(session)
        if s is not None and now - s.checked < 2.0:
            return s.alive
        try:
            consumers = self._consumers(queue)
        except Exception as exc:  # we cannot tell: assume alive (never drop work because of our own trouble)
            log.debug("session check of %s failed: %s", session, exc)
            return True
        if s is None:
            s = self._sessions[session] = _Session(now, True)
        s.checked = now
        if consumers is None:
            s.alive = False
        elif consumers > 0:
            s.alive, s.gone_since = True, None
        else:
            s.gone_since = s.gone_since or now
            s.alive = now - s.gone_since < self.cfg.session_grace
        if len(self._sessions) > 10_000:
            self._sessions = {k: v for k, v in self._sessions.items() if now - v.checked < 3600}
        return s.alive

    def _consumers(self, queue: str) -> int | None:
        """Consumers of ``queue`` (None: it does not exist)."""
        from amqp.exceptions import NotFound

        from .broker import connect, drop

        if self._check_conn is None:  # a passive declare answers at once: wait no longer than for a connection
            self._check_conn = connect(self.cfg, timeout=self.cfg.connect_timeout)
        try:
            channel = self._check_conn.channel()
            try:
                return int(channel.queue_declare(queue=queue, passive=True)[2])
            finally:
                if channel.is_open:
                    channel.close()
        except NotFound:
            return None
        except Exception:
            drop(self._check_conn)
            self._check_conn = None
            raise

    # -- flow ---------------------------------------------------------------------------------------------------

    def _pause(self) -> None:
        if self._paused or self._consumer is None:
            return
        self._paused = True
        for tag in list(self._consumer._active_tags.values()):
            self._channel.basic_cancel(tag, nowait=True)  # in order with the ack that follows: nothing more comes
        self._consumer._active_tags.clear()

    def _resume(self) -> None:
        if self._paused and not self._stopping and self._consumer is not None and len(self.held) < self.capacity:
            self._paused = False
            self._consumer.consume()

    @property
    def capacity(self) -> int:
        """How many tasks this worker holds at most: one per process — and, while its tasks are short, one more
        per process waiting, so a process that finishes starts the next at once instead of waiting for the
        broker. A long task is never held waiting (another worker may be free to run it)."""
        return self.concurrency * (2 if self._task_seconds < _SHORT_TASK else 1)

    def finished(self, msg: str, lost: str = "") -> None:
        """A task left the worker (done, failed, revoked); ``lost``: its pool process died running it."""
        held = self.held.pop(msg, None)
        if held is not None:
            self._task_seconds = 0.8 * self._task_seconds + 0.2 * (time.monotonic() - held.started)
            if lost:
                self._note(held.session, held.reply_to, lost=[[msg, lost]])
        if self._paused and self._c is not None:
            self._c.call_soon(self._resume)

    def stop_taking(self, why: str) -> None:
        """Take no more tasks (the running ones finish)."""
        if not self._stopping:
            log.info("taking no more tasks: %s", why)
        self._stopping = why
        self._pause()

    def release_unstarted(self) -> None:
        """At shutdown: give back the tasks taken but not started, so the clients send them again at once."""
        self._tell(self._unstarted(), "released")

    def give_back_unstarted(self) -> None:
        """The connection was lost: Celery has just dropped every task it had not started (``Consumer.on_close``
        clears the pool's waiting list, "they will be redelivered"). Ours were acknowledged already, so nothing
        redelivers them: kept here, they would hang their clients (leases renewed for a task that never runs).
        They go back to their clients with a "released" note as soon as the new connection is up (:meth:`attach`)."""
        self._give_back += self._unstarted()

    def _unstarted(self) -> list[_Held]:
        """Forget the held tasks that no pool process has accepted, and return them."""
        from celery.worker import state

        active = {r.id for r in state.active_requests}
        return [self.held.pop(msg) for msg in list(self.held) if msg not in active]

    # -- notes to the clients ---------------------------------------------------------------------------------------

    def renew(self) -> None:
        """Tell every client which of its tasks this worker holds (every ``lease_interval``)."""
        self._tell(self.held.values(), "held")
        now = time.time()
        if len(self._nonces) > 1000:
            self._nonces = {n: exp for n, exp in self._nonces.items() if exp > now}

    def _tell(self, tasks: Iterable[_Held], what: str) -> None:
        """One note per client: these of its tasks are ``what`` ("held", "released")."""
        by_session: dict[tuple[str, str], list[str]] = {}
        for held in tasks:
            by_session.setdefault((held.session, held.reply_to), []).append(held.msg)
        for (session, reply_to), ids in by_session.items():
            self._note(session, reply_to, **{what: ids})

    def _note(self, session: str, reply_to: str, **what: Any) -> None:
        if self._channel is None:
            return
        key = self._keys.get(session)
        if key is None:
            key = self._keys[session] = self.trust.result_key(session)
        body = Frame("lease", session, self.hostname, what).encode(key)
        try:
            self._channel.basic_publish(
                self._channel.prepare_message(
                    body,
                    content_type="application/x-mqexec-frame",
                    content_encoding="binary",
                    properties={"delivery_mode": 2},
                ),
                exchange=self.cfg.queue_prefix,
                routing_key=reply_to,
            )
        except Exception as exc:  # the connection is going; the next renewal after reconnecting covers it
            log.debug("lease note to %s failed: %s", reply_to, exc)

    def _first_task(self) -> None:
        """Say that this worker took its first task, as a worker event: sent while task events are off (the time to
        the first worker of ``mqexec submit dirac``)."""
        from .app import FIRST_TASK_EVENT

        dispatcher = getattr(self._c, "event_dispatcher", None)
        if dispatcher is not None:
            try:
                dispatcher.send(FIRST_TASK_EVENT)
            except Exception as exc:  # events are best effort
                log.debug("could not send %s: %s", FIRST_TASK_EVENT, exc)

    def _log_once(self, kind: str, text: str) -> None:
        kind = kind.split(":")[0][:60]
        if kind not in self._logged and len(self._logged) < _LOGGED_KINDS:
            self._logged.add(kind)
            log.warning("%s (logged once)", text)


def _check_envelope(task: Task, headers: dict[str, Any], body: list[Any]) -> None:
    """The Celery message around a signed task is not signed: it must ask for nothing but to run that task, as the
    client sends it — the same id, mqexec's task, no keyword arguments, callbacks, chain or chord (Celery would
    publish them with this worker's account), no ETA, expiry or time limit.

    Raises:
        SignatureError: something was added or changed.
    """
    embed = body[2] if len(body) > 2 and isinstance(body[2], dict) else {}
    if (
        headers.get("id") != task.id
        or headers.get("task") != TASK_NAME
        or body[1]
        or any(embed.get(k) for k in ("callbacks", "errbacks", "chain", "chord"))
        or any(headers.get(k) for k in ("eta", "countdown", "expires"))
        or any(headers.get("timelimit") or ())
    ):
        raise SignatureError(
            f"task {task.id} came in a Celery envelope changed after it was signed (another id or task name, "
            "arguments, callbacks, ETA or time limits)"
        )


class _GatedConsumer(KombuConsumer):  # type: ignore[misc]
    """kombu's consumer whose message handler (set by Celery's event loop) runs behind the gate."""

    def __init__(self, gate: Gate, *args: Any, **kwargs: Any) -> None:
        self._gate = gate
        self._handler: Any = None
        super().__init__(*args, **kwargs)

    @property
    def on_message(self) -> Any:
        if self._handler is None:
            return None
        return lambda message: self._gate.on_message(message, self._handler)

    @on_message.setter
    def on_message(self, handler: Any) -> None:
        self._handler = handler

    def consume(self, no_ack: bool | None = None) -> None:
        if not self._gate._paused:  # full after a reconnect: the gate consumes when a task finishes
            super().consume(no_ack)


class Tasks(bootsteps.StartStopStep):  # type: ignore[misc]
    """Replaces Celery's task-consumer step: the consumer goes through the :class:`Gate`, prefetch 1."""

    requires = ("celery.worker.consumer.mingle:Mingle",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        c.task_consumer = c.qos = None
        self._timer: Any = None
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        global _gate
        c.update_strategies()
        if _gate is None:
            _gate = Gate(c.app.mqexec_config, c.hostname)
        channel = c.connection.default_channel
        c.task_consumer = _GatedConsumer(
            _gate,
            channel,
            queues=list(c.app.amqp.queues.consume_from.values()),
            accept=["json"],
            on_decode_error=c.on_decode_error,
            prefetch_count=1,
        )
        c.qos = QoS(lambda prefetch_count: None, 1)  # read by Celery's event loop; prefetch stays 1
        _gate.attach(c, c.task_consumer)
        interval = c.app.mqexec_config.lease_interval
        self._timer = c.timer.call_repeatedly(interval, _gate.renew, priority=5)

    def stop(self, c: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if c.task_consumer is None or _gate is None:
            return
        if _restarting(c):  # the connection was lost and Celery restarts the consumer: the gate keeps the running
            _gate.give_back_unstarted()  # tasks and gives back those Celery dropped
            _gate.detach()
        else:
            _gate.stop_taking("the worker is stopping")

    def shutdown(self, c: Any) -> None:
        self.stop(c)
        if _gate is not None:
            _gate.release_unstarted()
            _gate.detach()
        if c.task_consumer is not None:
            try:
                c.task_consumer.close()
            except Exception as exc:
                log.debug("closing the task consumer: %s", exc)
            c.task_consumer = None

    def info(self, c: Any) -> dict[str, Any]:
        gate = _gate
        cfg = c.app.mqexec_config
        return {
            "mqexec": {
                "env": cfg.env,
                "resources": cfg.resources,
                "dirac_job": dirac_job_id(),
                "site": os.environ.get("DIRACSITE", ""),
                "held": len(gate.held) if gate else 0,
                "taken": gate.taken if gate else 0,
            }
        }


def _restarting(c: Any) -> bool:
    """Whether Celery stops the consumer's steps to reconnect (a lost connection), not to end the worker."""
    return bool(c.blueprint.state == bootsteps.RUN)


class DropEventConnection(bootsteps.StartStopStep):  # type: ignore[misc]
    """After a lost connection, drops the event dispatcher's connection without the close handshake.

    Celery drops its task connection (bounded, no handshake) but closes the event connection politely when it
    reconnects; a broker that vanished (a NAT forgot the connection) never answers, and the worker waited
    ``io_timeout`` for every step of the handshake while its new connection missed its heartbeats."""

    requires = ("celery.worker.consumer.events:Events",)

    def stop(self, c: Any) -> None:
        from .broker import drop

        if _restarting(c) and c.event_dispatcher is not None:
            drop(c.event_dispatcher.connection)  # events sent meanwhile are buffered and flushed after reconnecting


class Request(CeleryRequest):  # type: ignore[misc]
    """Celery's request, acknowledged by the gate already; tells the gate when the task leaves the worker."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery builds a subclass per task whose on_success does not call ours: wrap it where it is defined
        super().__init_subclass__(**kwargs)
        inner = cls.__dict__.get("on_success")
        if inner is not None:

            def on_success(self: Any, *args: Any, **kw: Any) -> Any:
                try:
                    return inner(self, *args, **kw)
                finally:
                    _left(self.id)

            cls.on_success = on_success

    def acknowledge(self) -> None:
        """The gate acknowledged the message when it took it."""

    def reject(self, requeue: bool = False) -> None:
        """Nothing to reject: the message was acknowledged when taken (a lost task is resent by its client)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        from billiard.exceptions import WorkerLostError

        try:
            return super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        finally:
            exc = getattr(exc_info, "exception", None)
            exc = getattr(exc, "exc", exc)  # billiard wraps it in ExceptionWithTraceback
            _left(self.id, lost=str(exc) if isinstance(exc, WorkerLostError) else "")

    def _announce_revoked(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._announce_revoked(*args, **kwargs)
        finally:
            _left(self.id)

    def _announce_cancelled(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super()._announce_cancelled(*args, **kwargs)
        finally:
            _left(self.id, lost="cancelled by the worker")


def _left(msg: str, lost: str = "") -> None:
    if _gate is not None:
        _gate.finished(msg, lost=lost)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer with mqexec's intake and remote-control steps, the event connection dropped after a lost
    connection, and without native delayed delivery (mqexec sends no countdown/ETA tasks; it would declare 27
    ``celery_delayed_*`` queues)."""

    class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc,name-defined]
        default_steps = [
            {
                "celery.worker.consumer.tasks:Tasks": "mqexec.intake:Tasks",
                "celery.worker.consumer.control:Control": "mqexec.control:ControlStep_",
            }.get(s, s)
            for s in CeleryConsumer.Blueprint.default_steps
            if "delayed_delivery" not in s
        ] + ["mqexec.intake:DropEventConnection"]


__all__ = [
    "Consumer",
    "ControlStep_",
    "DropEventConnection",
    "Gate",
    "Request",
    "Tasks",
    "current_gate",
    "dirac_job_id",
]
