"""The body of every task message, in a worker's pool process.

    task (checked by the gate, intake.py) ──▶ Python version? (else: EnvironmentMismatch, nothing unpickled)
        ──▶ the analysis's modules (codeship.Installer) ──▶ the function (inline, or blob cache by hash)
        ──▶ for each call: arguments (futures inside resolved to their values) ──▶ run (retries; coroutines
            awaited) ──▶ value pickled: data lake (above result_inline_limit, when configured) · else the broker
        ──▶ one result frame, with the values that fit into piece_size together; each other value in piece frames
            of piece_size ──▶ signed, publisher-confirmed ──▶ the client's results queue

No message is larger than ``piece_size`` (plus a small head), however big a value or a batch of values; a broker
that refuses a message as too large (its ``max_message_size``) is answered with pieces below its limit from then
on. Errors travel as descriptions (``remote.py``), never as pickles. Publishing is retried across broker blips for
up to ``lease_timeout``; if it still fails, the client's lease runs out and it sends the task again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .blobs import BlobCache, MissingBlob, pieces
from .broker import connect, drop, refused_size
from .codeship import Installer
from .errors import EnvironmentMismatch, SerializationError
from .remote import describe
from .wire import PYTHON, Call, Frame, Key, Outcome, Ref, Task, key_to_json, resolving, result_frame, sha256

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("mqexec.worker")
_executor: Executor | None = None
_HEAD_ROOM = 64 * 1024  #: a frame's bytes besides its value (head, signature)


class CallsFailed(Exception):
    """Raised after a task's outcomes were sent, when a call of it failed: Celery then reports the task as failed
    (Flower shows it with this one-line exception). It is never logged as a traceback (``worker.setup_logging``)."""


def run(cfg: Config, wire: Any, hostname: str) -> None:
    """Run one task message (the Celery task body)."""
    global _executor
    if _executor is None:
        _executor = Executor(cfg, hostname)
    _executor(wire)


class Executor:
    """Runs tasks in one pool process; keeps its caches (functions, blobs, code, lakes) and its connection."""

    def __init__(self, cfg: Config, hostname: str) -> None:
        self.cfg = cfg
        self.trust = cfg.trust()
        self.hostname = hostname
        self.blobs = BlobCache(cfg, self._connection)
        self.code = Installer(cfg.cache_dir)
        self._lakes: dict[str, Any] = {}
        self._conn: Any = None
        self._piece_size = cfg.piece_size  #: lowered when the broker refuses a message as too large
        self._task_lake: str | None = None

    def __call__(self, wire: Any) -> None:
        started = time.perf_counter()
        task = Task.checked(wire)  # the gate (intake.py) verified its signature in the worker's main process
        outcomes = self.run(task)
        self.publish(task, outcomes)
        failed = [o for o in outcomes if not o.ok]
        label = task.calls[0].label + (f" +{len(task.calls) - 1} more" if len(task.calls) > 1 else "")
        log.info(
            "ran %s in %.3f s%s", label, time.perf_counter() - started, f", {len(failed)} failed" if failed else ""
        )
        if failed:  # the outcomes went to the client already; this only makes Flower show the task as failed
            error = failed[0].error or {}
            more = f" (+{len(failed) - 1} more calls failed)" if len(failed) > 1 else ""
            raise CallsFailed(f"{error.get('type', '?').rpartition('.')[2]}: {error.get('str', '')}{more}")

    def run(self, task: Task) -> list[Outcome]:
        self._task_lake = task.lake
        if task.python != PYTHON:
            exc = EnvironmentMismatch(
                f"task {task.id} was pickled by Python {task.python} but this worker runs Python {PYTHON}: start "
                f"workers with the client's Python (queue {self.cfg.env})"
            )
            return self._all_failed(task, exc, "env")
        try:
            if task.code is not None:
                code = task.code
                self.code.activate(code.blob or sha256(code.data or b""), lambda: self._bytes(code))
            fn = self._function(task.fn)
        except Exception as exc:
            return self._all_failed(task, exc, "blob" if isinstance(exc, MissingBlob) else "code")
        return [self._call(task, fn, call) for call in task.calls]

    def _all_failed(self, task: Task, exc: BaseException, system: str) -> list[Outcome]:
        error = self._describe(exc)
        return [Outcome(c.key, False, error=error, system=system) for c in task.calls]

    def _describe(self, exc: BaseException) -> dict[str, Any]:
        d = describe(exc)
        for frame in d["frames"]:
            frame[0] = self.code.client_path(frame[0])
        return d

    def _bytes(self, ref: Ref) -> bytes:
        if ref.data is not None:
            return ref.data
        if ref.blob is not None:
            return self.blobs.get(ref.blob, ref.size, ref.pieces)
        from .lake import LakeRef

        assert ref.lake is not None and self._task_lake is not None, (
            "a data-lake value came with a task that names no lake"
        )
        return bytes(self._lake(self._task_lake).get(LakeRef.from_dict(ref.lake)))

    def _function(self, ref: Ref) -> Any:
        import cloudpickle

        digest = ref.blob or sha256(ref.data or b"")

        def load() -> Any:
            try:
                return cloudpickle.loads(self._bytes(ref))
            except MissingBlob:
                raise
            except Exception as exc:
                raise SerializationError(
                    f"cannot unpickle the function on this worker: {type(exc).__name__}: {exc} "
                    "(is the same package installed on the worker?)"
                ) from exc

        return self.blobs.remember(f"{digest}:{self.code.active}", load)

    def _values(self, call: Call) -> Callable[[Key], Any]:
        import cloudpickle

        refs = dict(call.deps)
        loaded: dict[Key, Any] = {}

        def value(key: Key) -> Any:
            if key not in loaded:
                if key not in refs:
                    raise KeyError(f"the value of future {key!r} did not come with the task")
                loaded[key] = cloudpickle.loads(self._bytes(refs[key]))
            return loaded[key]

        return value

    def _call(self, task: Task, fn: Any, call: Call) -> Outcome:
        """One call's outcome, with how long it took (clients send calls of fast functions in batches)."""
        started = time.perf_counter()
        outcome = self._outcome(task, fn, call)
        return dataclasses.replace(outcome, seconds=time.perf_counter() - started)

    def _outcome(self, task: Task, fn: Any, call: Call) -> Outcome:
        import cloudpickle

        try:
            with resolving(self._values(call)):
                args, kwargs = cloudpickle.loads(self._bytes(call.args))
        except MissingBlob as exc:
            return Outcome(call.key, False, error=self._describe(exc), system="blob")
        except Exception as exc:
            return Outcome(call.key, False, error=self._describe(exc))
        from .outputs import task_context  # open_output() inside the task writes to the task's lake

        for attempt in range(call.retries + 1):
            try:
                with task_context(task.lake, call.key):
                    value = fn(*args, **kwargs)
                    if inspect.iscoroutine(value):
                        value = asyncio.run(value)
                break
            except Exception as exc:
                if attempt == call.retries:
                    return Outcome(call.key, False, error=self._describe(exc))
                log.info("%s raised %s: retry %d of %d", call.label, type(exc).__name__, attempt + 1, call.retries)
        type_name = f"{type(value).__module__}.{type(value).__qualname__}"
        try:
            data = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            err = SerializationError(f"the result of {call.label} cannot be pickled: {type(exc).__name__}: {exc}")
            return Outcome(call.key, False, error=self._describe(err))
        if task.lake and len(data) > self.cfg.result_inline_limit:
            try:
                ref = self._lake(task.lake).put(data).to_dict()
                return Outcome(call.key, True, type_name, lake=ref)
            except Exception as exc:  # fall back to the broker, in pieces if need be
                log.warning(
                    "could not put the result of %s into the data lake (%s): sending it through the broker",
                    call.label,
                    exc,
                )
        return Outcome(call.key, True, type_name, value=data)  # how it travels: see _frames

    def _lake(self, url: str) -> Any:
        from .lake import open_lake

        if url not in self._lakes:
            self._lakes[url] = open_lake(url)
        return self._lakes[url]

    # -- results ------------------------------------------------------------------------------------------------

    def _connection(self) -> Any:
        return connect(self.cfg)

    def _frames(self, task: Task, outcomes: list[Outcome], key: bytes) -> list[bytes]:
        """The signed frames of a task's outcomes: the values that fit into ``piece_size`` together travel in the
        result frame (last), each other one in piece frames of its own."""
        frames: list[bytes] = []
        room = self._piece_size
        sent = []
        for o in outcomes:
            if o.value is not None and len(o.value) > room:
                parts = pieces(o.value, self._piece_size)
                for i, part in enumerate(parts):
                    head = {"msg": task.id, "k": key_to_json(o.key), "i": i}
                    frames.append(Frame("piece", task.session, self.hostname, head, (part,)).encode(key))
                o = replace(o, value=None, pieces=len(parts), size=len(o.value), sha=sha256(o.value))
            elif o.value is not None:
                room -= len(o.value)
            sent.append(o)
        site = os.environ.get("DIRACSITE", "")
        frames.append(result_frame(task.session, self.hostname, task.id, sent, site).encode(key))
        return frames

    def _fit_below(self, exc: BaseException) -> bool:
        """If the broker refused a message as larger than its ``max_message_size``: cut pieces below that from now
        on, and say so once. True if the frames are to be cut again."""
        limit = refused_size(exc)
        if limit is None or limit - _HEAD_ROOM >= self._piece_size:
            return False
        self._piece_size = max(limit - _HEAD_ROOM, _HEAD_ROOM)
        log.warning(
            "the broker refuses messages over %d bytes (its max_message_size), below piece_size: sending results in "
            "pieces of %d bytes from now on (set MQEXEC_PIECE_SIZE below %d)",
            limit,
            self._piece_size,
            limit,
        )
        return True

    def publish(self, task: Task, outcomes: list[Outcome]) -> None:
        """The outcomes' frames (:meth:`_frames`), each confirmed by the broker; retried across blips."""
        key = self.trust.result_key(task.session)
        frames = self._frames(task, outcomes, key)
        deadline = time.monotonic() + self.cfg.lease_timeout
        delay = 0.2
        while True:
            try:
                if self._conn is None:
                    self._conn = connect(self.cfg, confirm=True)
                channel = self._conn.default_channel
                for body in frames:
                    message = channel.prepare_message(
                        body,
                        content_type="application/x-mqexec-frame",
                        content_encoding="binary",
                        properties={"delivery_mode": 2},
                    )
                    channel.basic_publish(message, exchange=self.cfg.queue_prefix, routing_key=task.reply_to)
                return
            except Exception as exc:
                drop(self._conn)
                self._conn = None
                if self._fit_below(exc):
                    frames = self._frames(task, outcomes, key)
                    continue
                if time.monotonic() > deadline:
                    log.error("gave up sending the result of task %s (%s); its client will send it again", task.id, exc)
                    return
                why = f"{type(exc).__name__}: {exc}"
                log.warning("sending the result of task %s failed (%s): retrying in %.1f s", task.id, why, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
