"""The task body a worker runs for every task message.

    delivery ──▶ verify signature ──(forged: reject, dead-lettered, never unpickled)
             ──▶ check environment ──(other Python: error result, never unpickled)
             ──▶ function by hash (inline, else blob cache) ──▶ for each call: unpickle args, resolve refs,
                 run (with retries) ──▶ one signed result message to the client's result queue ──▶ ack

The message is acknowledged only after the result was published with a publisher confirm
(``task_acks_late``), so a worker that dies before that leaves the task to be delivered again.
"""

from __future__ import annotations

import logging
import pickle
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .blobs import BlobCache
from .envelope import Call, Outcome, ResultEnvelope, TaskEnvelope, environment
from .errors import EnvironmentMismatch, RemoteError, SerializationError, SignatureError

if TYPE_CHECKING:
    from celery import Celery

    from .config import Config

log = logging.getLogger("mqexec.worker")


class BlobArg:
    """Stands in a call's arguments for a payload shipped once (``Client.scatter``); resolved on the worker."""

    __slots__ = ("digest",)

    def __init__(self, digest: str) -> None:
        self.digest = digest

    def __reduce__(self) -> tuple[Any, ...]:
        return (BlobArg, (self.digest,))


class LakeArg:
    """Stands in a call's arguments for a result that went to the data lake; resolved on the worker."""

    __slots__ = ("ref",)

    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref

    def __reduce__(self) -> tuple[Any, ...]:
        return (LakeArg, (self.ref,))


def replace_leaves(obj: Any, kinds: type | tuple[type, ...], fn: Any) -> Any:
    """``obj`` with every ``kinds`` instance inside lists, tuples, sets and dicts replaced by ``fn(it)``."""
    if isinstance(obj, kinds):
        return fn(obj)
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(replace_leaves(x, kinds, fn) for x in obj)
    if type(obj) is dict:
        return {k: replace_leaves(v, kinds, fn) for k, v in obj.items()}
    return obj


def _dumps(obj: Any) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def exception_bytes(exc: BaseException) -> bytes:
    """The pickled exception, or a :class:`RemoteError` carrying its type and message if it won't pickle."""
    try:
        data = _dumps(exc)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RemoteError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"))


class Executor:
    """Runs envelopes inside one pool process; keeps the function and blob caches of that process."""

    def __init__(self, app: Celery, cfg: Config) -> None:
        self.app = app
        self.cfg = cfg
        self.env = environment()
        self.blobs = BlobCache(Path(cfg.cache_dir) / "blobs", cfg.queue_prefix)
        self._lakes: dict[str, Any] = {}

    def __call__(self, wire: Any, hostname: str) -> None:
        from celery.exceptions import Reject

        try:
            task = TaskEnvelope.decode(wire, self.cfg.secret)
        except SignatureError as exc:
            log.warning("rejected a task message, never unpickled, dead-lettered: %s", exc)
            raise Reject(str(exc), requeue=False) from None
        started = time.perf_counter()
        outcomes = self.run(task)
        self.publish(task, ResultEnvelope(task.id, hostname, outcomes, self.env))
        failed = sum(not o.ok for o in outcomes)
        label = task.calls[0].label + (f" +{len(task.calls) - 1} more" if len(task.calls) > 1 else "")
        log.info("ran %s in %.3f s%s", label, time.perf_counter() - started, f", {failed} failed" if failed else "")

    def run(self, task: TaskEnvelope) -> tuple[Outcome, ...]:
        if task.env.get("python") != self.env["python"]:
            exc = EnvironmentMismatch(
                f"task {task.id} was pickled by Python {task.env.get('python')} but this worker runs Python "
                f"{self.env['python']}: start workers with the client's Python (queue {self.cfg.env})"
            )
            return self._failed_all(task, exc, "env")
        try:
            fn = self._function(task)
        except Exception as exc:
            return self._failed_all(task, exc, "unpickle")
        return tuple(self._call(fn, call, task.lake) for call in task.calls)

    def _failed_all(self, task: TaskEnvelope, exc: BaseException, kind: str) -> tuple[Outcome, ...]:
        data = exception_bytes(exc)
        tb = "".join(traceback.format_exception(exc))
        return tuple(Outcome(c.key, False, data, traceback=tb, error=kind) for c in task.calls)

    def _function(self, task: TaskEnvelope) -> Any:
        import cloudpickle

        def load(data: bytes) -> Any:
            try:
                return cloudpickle.loads(data)
            except Exception as exc:
                raise SerializationError(
                    f"cannot unpickle the function of task {task.id} on this worker: "
                    f"{type(exc).__name__}: {exc} (is the same package installed on the worker?)"
                ) from exc

        if task.fn.inline is not None:
            return self.blobs.remember(task.fn.hash, lambda: load(task.fn.inline or b""))
        return self.blobs.loaded(task.fn.hash, load, self.app.connection_for_read)

    def _resolve(self, obj: Any, lake_url: str | None) -> Any:
        """The call's arguments with blob and data-lake references replaced by their values."""
        import cloudpickle

        def value(ref: BlobArg | LakeArg) -> Any:
            if isinstance(ref, BlobArg):
                return self.blobs.loaded(ref.digest, cloudpickle.loads, self.app.connection_for_read)
            from .lake import LakeRef

            return cloudpickle.loads(self._lake(lake_url).get(LakeRef.from_dict(ref.ref)))

        return replace_leaves(obj, (BlobArg, LakeArg), value)

    def _call(self, fn: Any, call: Call, lake_url: str | None) -> Outcome:
        import cloudpickle

        started = time.perf_counter()
        try:
            args, kwargs = self._resolve(cloudpickle.loads(call.payload), lake_url)
        except Exception as exc:
            return Outcome(call.key, False, exception_bytes(exc), traceback=traceback.format_exc(), error="unpickle")
        for attempt in range(call.retries + 1):
            try:
                value = fn(*args, **kwargs)
                break
            except Exception as exc:
                if attempt == call.retries:
                    return Outcome(
                        call.key,
                        False,
                        exception_bytes(exc),
                        traceback=traceback.format_exc(),
                        seconds=time.perf_counter() - started,
                    )
                log.info("%s raised %s: retry %d of %d", call.label, type(exc).__name__, attempt + 1, call.retries)
        try:
            data = _dumps(value)
        except Exception as exc:
            err = SerializationError(f"the result of {call.label} cannot be pickled: {exc}")
            return Outcome(call.key, False, exception_bytes(err), traceback=traceback.format_exc())
        seconds = time.perf_counter() - started
        if lake_url and len(data) > self.cfg.result_inline_limit:
            ref = self._lake(lake_url).put(data).to_dict()
            return Outcome(call.key, True, ref=ref, seconds=seconds)
        return Outcome(call.key, True, data, seconds=seconds)

    def _lake(self, url: str | None) -> Any:
        from .lake import open_lake

        if not url:
            raise SerializationError("a data-lake reference arrived, but the task names no data lake")
        if url not in self._lakes:
            self._lakes[url] = open_lake(url)
        return self._lakes[url]

    def publish(self, task: TaskEnvelope, result: ResultEnvelope) -> None:
        body = result.encode(self.cfg.secret)
        with self.app.producer_or_acquire() as producer:
            producer.publish(
                body,
                exchange="",
                routing_key=task.reply_to,
                serializer=None,
                content_type="application/x-mqexec-result",
                content_encoding="binary",
                delivery_mode=2,
                retry=True,
                retry_policy={"max_retries": 5},
            )


def register(app: Celery, cfg: Config) -> None:
    """Register the ``mqexec.run`` task body on a worker's app."""
    from .app import TASK_NAME

    executor: list[Executor] = []

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run(self: Any, wire: Any) -> None:
        if not executor:
            executor.append(Executor(app, cfg))
        executor[0](wire, self.request.hostname or "?")
