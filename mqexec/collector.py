"""The client's one background consumer: reads its result queue and settles futures.

    worker ──result──▶ mqexec.results.<session> ──▶ Collector thread ──▶ Client._settle(key, outcome)
    broker ──dead letter (headers exchange, matched on mqexec-reply)──┘      (first outcome per key wins)

The queue is durable and expires only after the client has been gone for ``results_expire`` seconds, so a
result published while this consumer reconnects waits for it. Messages are acknowledged after the futures
were settled. Every ``no_worker_grace`` seconds without progress, the thread asks whether any worker consumes
the client's task queues and, if only workers of other environments are connected, fails the waiting
futures with :class:`~mqexec.errors.NoWorkerError` naming them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .envelope import ResultEnvelope, TaskEnvelope
from .errors import SignatureError

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("mqexec.client")


class Collector(threading.Thread):
    def __init__(self, client: Client) -> None:
        super().__init__(name=f"mqexec-collector-{client.session}", daemon=True)
        self.client = client
        self._stop_event = threading.Event()
        self.last_progress = time.monotonic()
        self._last_check = time.monotonic()
        self.ready = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        from kombu import Consumer

        from .broker import connect

        backoff = 0.5
        while not self._stop_event.is_set():
            try:
                with connect(self.client.config) as conn:
                    queue = self.client.results_queue(conn.default_channel)
                    with Consumer(
                        conn.default_channel,
                        queues=[queue],
                        on_message=self._on_message,
                        prefetch_count=200,
                        no_ack=False,
                    ):
                        self.ready.set()
                        backoff = 0.5
                        while not self._stop_event.is_set():
                            with contextlib.suppress(TimeoutError):
                                conn.drain_events(timeout=0.25)
                            self.client._purge()
                            self._watchdog()
            except Exception as exc:
                if self._stop_event.is_set():
                    return
                log.warning("result consumer lost the broker (%s); reconnecting in %.1f s", exc, backoff)
                self._stop_event.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _on_message(self, message: Any) -> None:
        try:
            if message.content_type == "application/x-mqexec-result":
                self._on_result(message.body)
            else:
                self._on_dead_letter(message)
        except Exception:
            log.exception("could not process a message on %s", self.client.reply_to)
        message.ack()

    def _on_result(self, raw: bytes) -> None:
        try:
            result = ResultEnvelope.decode(raw, self.client.config.secret)
        except SignatureError as exc:
            log.error("dropped a result message, never unpickled: %s", exc)
            return
        self.last_progress = time.monotonic()
        for outcome in result.outcomes:
            self.client._settle(outcome, result.worker)

    def _on_dead_letter(self, message: Any) -> None:
        """A task message the broker gave up on, routed back here by the dead-letter exchange."""
        deaths = (message.headers or {}).get("x-death") or [{}]
        reason = deaths[0].get("reason", "?")
        try:
            args = json.loads(message.body)[0]
            task = TaskEnvelope.decode(args[0], self.client.config.secret)
        except (SignatureError, ValueError, IndexError, KeyError, TypeError):
            log.error("a dead-lettered message that this client did not sign arrived (reason %s): dropped", reason)
            return
        self.last_progress = time.monotonic()
        self.client._dead_lettered(task, reason, deaths[0].get("count"))

    def _watchdog(self) -> None:
        now = time.monotonic()
        grace = self.client.config.no_worker_grace
        if now - self.last_progress < grace or now - self._last_check < grace:
            return
        self._last_check = now
        if self.client._in_flight():
            self.client._check_workers()
