"""The futures client: ``submit``/``map``/``gather``/``scatter``/``cancel``, as in ``distributed.Client``.

    Client.submit/map ──(pickle fn once, args per call; batch small calls)──▶ exchange "mqexec"
        ──▶ task queue mqexec.py3.11 ──▶ workers ──▶ result queue mqexec.results.<session>
        ──▶ Collector thread ──▶ FutureState (first outcome per key wins) ──▶ Future.result()

A call whose arguments hold futures waits on the client until they are done, then goes out with their values
in their place (results are on the client anyway; big ones travel as data-lake references instead). A future
can be cancelled until its result arrives: if its message is still queued, workers are told to drop it.

    with mqexec.Client("amqp://guest:guest@127.0.0.1:5672//") as client:   # or Client(): embedded default
        fut = client.submit(lambda x: x + 1, 41)
        fut.result()                                   # 42
        total = sum(client.gather(client.map(square, range(1000))))
"""

from __future__ import annotations

import functools
import logging
import pickle
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .app import REPLY_HEADER, TASK_NAME, make_app, queue_name, redact, task_queue, transport_of
from .blobs import blob_queue_name, put_blob
from .broker import connect
from .collector import Collector
from .config import Config
from .envelope import Call, FunctionRef, Outcome, TaskEnvelope, environment, sha256
from .errors import NoWorkerError, RemoteTraceback, SerializationError, TaskDeadLettered
from .execute import BlobArg, LakeArg, replace_leaves
from .futures import Future, FutureState, _Lazy

log = logging.getLogger("mqexec.client")
_SCATTER_INLINE = 64 * 1024  #: scattered data larger than this is shipped once per worker as a blob


@dataclass
class _Pending:
    """A call held on the client until the futures in its arguments are done."""

    fn: FunctionRef
    key: str
    label: str
    args: Any
    retries: int
    resource: str | None
    deps: set[str] = field(default_factory=set)


@dataclass
class _Sent:
    """A task message on its way: its calls' keys, its resource queue, and (embedded default only) the
    envelope, kept to publish again if the local worker that held it dies."""

    keys: list[str]
    resource: str | None
    envelope: TaskEnvelope | None


def _funcname(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


def _label(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    shown = ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()])
    text = f"{name}({shown})"
    return text if len(text) <= 80 else text[:77] + "...)"


class Client:
    """A connection to a broker (or the embedded default) that runs functions on mqexec workers.

    >>> client = Client("amqp://guest:guest@127.0.0.1:5672//")    # doctest: +SKIP
    >>> client.submit(sum, [1, 2, 3]).result()                     # doctest: +SKIP
    6

    Args:
        address: broker URL (``amqp://``, ``amqps://``); None (and no ``MQEXEC_BROKER_URL``) starts the
            embedded default — a local broker and local worker processes, the same code path as the grid.
        n_workers: local worker processes of the embedded default (each with ``concurrency`` pool processes).
        **settings: any :class:`~mqexec.config.Config` field (``secret``, ``lake_url``, ``concurrency``, ...).

    Raises:
        BrokerError: the broker cannot be reached or refused the login (within ``connect_timeout`` s).
    """

    def __init__(self, address: str | None = None, *, n_workers: int = 1, **settings: Any) -> None:
        cfg = Config.load(broker_url=address, **settings)
        self._local = None
        if cfg.broker_url is None:
            from .local import LocalCluster

            self._local = LocalCluster(cfg, n_workers=n_workers)
            cfg = self._local.config
        self.config = cfg.with_secret()
        self.session = uuid.uuid4().hex[:12]
        self.reply_to = f"{cfg.queue_prefix}.results.{self.session}"
        self._transport = transport_of(cfg.broker_url or "")
        self._env = environment()
        self._lock = threading.RLock()
        self._states: dict[str, FutureState] = {}
        self._inflight: dict[str, str] = {}  # call key → message id, until its outcome arrives
        self._messages: dict[str, _Sent] = {}  # message id → what was sent, until all its outcomes arrived
        self._waiting: dict[str, _Pending] = {}  # call key → held call
        self._dependents: dict[str, set[str]] = {}  # dep key → keys of held calls
        self._scattered: dict[str, str] = {}  # key → blob digest
        self._refs: dict[str, dict[str, Any]] = {}  # key → data-lake ref of its result
        self._blobs: set[str] = set()
        self._declared: set[str | None] = set()
        self._handles: Counter[str] = Counter()  # key → live Future handles
        self._released: queue.SimpleQueue[str] = queue.SimpleQueue()  # filled by Future.release/__del__
        try:
            self._conn = connect(self.config)
        except BaseException:
            self._close_local()
            raise
        self._app = make_app(self.config)
        self._collector = Collector(self)
        self._collector.start()
        self._collector.ready.wait(self.config.connect_timeout + 5)
        self.status = "running"
        log.info(
            "client %s connected to %s (queue %s)",
            self.session,
            redact(self.config.broker_url or ""),
            queue_name(self.config),
        )

    # -- public API ---------------------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        key: str | None = None,
        pure: bool = True,
        retries: int = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        label: str | None = None,
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker; returns its :class:`Future`.

        >>> client.submit(lambda x: x + 1, 41).result()    # doctest: +SKIP
        42

        Args:
            key: the future's key; by default ``<name>-<hash of fn and arguments>`` (``pure=True``: the same
                call gives the same future) or ``<name>-<uuid>`` (``pure=False``).
            retries: extra attempts on the worker if ``fn`` raises.
            priority: accepted for ``distributed`` compatibility; quorum queues (RabbitMQ 3.x) are FIFO, so
                tasks run in the order they were submitted.
            resources: e.g. ``{"GPU": 1}`` routes to workers started with ``--resources GPU=1``.
            label: a readable name for logs and Flower (default: the call, shortened).

        Raises:
            SerializationError: ``fn`` or an argument cannot be pickled (names which).
        """
        return self._submit(
            fn,
            [(args, kwargs)],
            [key] if key else None,
            pure,
            retries,
            priority,
            resources,
            [label] if label else None,
            batch_size=1,
        )[0]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[str] | None = None,
        pure: bool = True,
        retries: int = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        batch_size: int | None = None,
        labels: list[str] | None = None,
        **kwargs: Any,
    ) -> list[Future]:
        """``fn`` over the zipped iterables, one future per call.

        Small calls are batched into fewer broker messages (``batch_size``; default: about 200 messages per
        map, at most 50 calls each); each call keeps its own future.

        >>> sum(client.gather(client.map(lambda x: x * x, range(1000))))    # doctest: +SKIP
        332833500
        """
        calls = [(tuple(args), dict(kwargs)) for args in zip(*iterables, strict=False)]
        keys = key if isinstance(key, list) else None
        if isinstance(key, str):
            keys = [f"{key}-{i}" for i in range(len(calls))]
        if batch_size is None:
            batch_size = max(1, min(50, -(-len(calls) // 200)))
        return self._submit(fn, calls, keys, pure, retries, priority, resources, labels, batch_size)

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """The results of futures, in the same structure (a future, or lists/tuples/dicts of them).

        Args:
            errors: ``"raise"`` re-raises the first error; ``"skip"`` leaves failed futures out.
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        if isinstance(futures, Future):
            return futures.result()
        if isinstance(futures, dict):
            out = {k: self.gather([v], errors) for k, v in futures.items()}
            return {k: v[0] for k, v in out.items() if v}
        if isinstance(futures, list | tuple | set):
            values = []
            for f in futures:
                if isinstance(f, Future) and errors == "skip":
                    f._wait(None)
                    if f.status != "finished":
                        continue
                values.append(self.gather(f, errors) if isinstance(f, Future | list | tuple | dict) else f)
            return type(futures)(values) if not isinstance(futures, set) else values
        return futures

    def scatter(self, data: Any, hash: bool = True, broadcast: bool = False) -> Any:
        """Ship data to the workers once (content-addressed); returns futures to pass to tasks.

        A list or dict scatters each element (as ``distributed`` does); anything else becomes one future.
        Data over 64 KiB is sent to the broker once and cached by each worker; smaller data travels inside
        the calls that use it.

        >>> big = client.scatter(np.arange(10**7))          # doctest: +SKIP
        >>> client.submit(np.sum, big).result()             # doctest: +SKIP
        """
        if isinstance(data, list | tuple):
            return type(data)(self._scatter_one(x, hash) for x in data)
        if isinstance(data, dict):
            return {k: self._scatter_one(v, hash) for k, v in data.items()}
        return self._scatter_one(data, hash)

    def _scatter_one(self, data: Any, hash: bool) -> Future:
        payload = self._dumps(data, "the scattered data")
        digest = sha256(payload)
        key = f"{type(data).__name__}-{digest[:32] if hash else uuid.uuid4().hex}"
        with self._lock:
            state = self._states.setdefault(key, FutureState())
            if len(payload) > _SCATTER_INLINE:  # small data rides inside the calls that use it
                self._scattered[key] = self._put_blob(payload, digest)
        state.finish(data)
        return Future(key, state, self)

    def cancel(self, futures: Future | Iterable[Future]) -> bool:
        """Cancel futures; those still queued are revoked on the workers. True if any was pending."""
        futures = [futures] if isinstance(futures, Future) else list(futures)
        revoke: list[str] = []
        any_pending = False
        with self._lock:
            for f in futures:
                state = self._states.get(f.key)
                if state is None or not state.cancel():
                    continue
                any_pending = True
                self._waiting.pop(f.key, None)
                msg = self._inflight.get(f.key)
                sent = self._messages.get(msg) if msg is not None else None
                self._landed(f.key)
                if (
                    msg is not None
                    and sent is not None
                    and all(self._states.get(k, f._state).status == "cancelled" for k in sent.keys)
                ):
                    revoke.append(msg)
        if revoke:
            self._app.control.revoke(revoke)
        return any_pending

    def close(self) -> None:
        """Cancel what is still pending, delete this session's queues and stop the embedded workers."""
        if self.status == "closed":
            return
        self.status = "closed"
        with self._lock:
            pending = [Future(k, s, None) for k, s in self._states.items() if s.status == "pending"]
        for f in pending:
            f._state.cancel()
        self._collector.stop()
        self._collector.join(timeout=5)
        try:
            channel = self._conn.default_channel
            for name in [self.reply_to] + [blob_queue_name(self.config.queue_prefix, d) for d in self._blobs]:
                channel.queue_delete(name)
        except Exception as exc:  # the broker may already be gone; the queues then expire on their own
            log.debug("could not delete session queues: %s", exc)
        self._conn.release()
        self._close_local()
        log.info("client %s closed", self.session)

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Compute a dask graph on the workers: a dask scheduler, ``dask.compute(x, scheduler=client.get)``.

        Chains of tasks that need no other chain run as one mqexec task (graph fusion); see
        :mod:`mqexec.adapters.dask`.
        """
        from .adapters.dask import get

        return get(self, dsk, keys, **kwargs)

    def compute(self, collections: Any, sync: bool = False, **kwargs: Any) -> Any:
        """Submit dask collections; returns a Future per collection (their values if ``sync=True``)."""
        from .adapters.dask import compute

        return compute(self, collections, sync=sync, **kwargs)

    def __enter__(self) -> Client:
        """Inside ``with Client(...)``, dask computes on this client (as with ``distributed.Client``)."""
        import importlib.util

        if importlib.util.find_spec("dask") is not None:
            from .adapters.dask import default_scheduler

            self._dask_default: Any = default_scheduler(self)
            self._dask_default.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if getattr(self, "_dask_default", None) is not None:
            self._dask_default.__exit__(None, None, None)
            self._dask_default = None
        self.close()

    def __repr__(self) -> str:
        return f"<mqexec.Client {redact(self.config.broker_url or '')} session={self.session} {self.status}>"

    # -- submission ---------------------------------------------------------------------------------------

    def _dumps(self, obj: Any, what: str) -> bytes:
        import cloudpickle

        try:
            return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(f"cannot pickle {what}: {type(exc).__name__}: {exc}") from None

    def _submit(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        keys: list[str] | None,
        pure: bool,
        retries: int,
        priority: int,
        resources: dict[str, float] | None,
        labels: list[str] | None,
        batch_size: int,
    ) -> list[Future]:
        if self.status == "closed":
            raise RuntimeError("this client is closed")
        if not callable(fn):
            raise TypeError(f"first argument must be callable, got {fn!r}")
        name = _funcname(fn)
        pickled = self._dumps(fn, f"the function {name!r} ({fn!r})")
        ref = FunctionRef.of(pickled, self.config.inline_limit)
        if ref.inline is None:
            self._put_blob(pickled, ref.hash)
        resource = ",".join(sorted(resources)) if resources else None
        futures: list[Future] = []
        ready: list[Call] = []
        with self._lock:
            for i, (args, kwargs) in enumerate(calls):
                deps = _futures_in((args, kwargs))
                payload = self._dumps((args, kwargs), f"argument of {name}() call {i}")
                if keys is not None:
                    key = keys[i]
                elif pure:
                    key = f"{name}-{sha256(ref.hash.encode() + payload)[:32]}"
                else:
                    key = f"{name}-{uuid.uuid4().hex}"
                label = labels[i] if labels else _label(name, args, kwargs)
                state = self._states.get(key)
                if state is not None and state.status != "cancelled":
                    futures.append(Future(key, state, self))
                    continue
                state = self._states[key] = FutureState()
                futures.append(Future(key, state, self))
                if deps:
                    self._hold(_Pending(ref, key, label, (args, kwargs), retries, resource, deps))
                else:
                    ready.append(Call(key, label, payload, retries))
        if ready:
            self._publish(ref, ready, resource, batch_size)
        return futures

    def _hold(self, pending: _Pending) -> None:
        """Keep a call until its dependencies are done (called under the lock)."""
        self._waiting[pending.key] = pending
        for dep in list(pending.deps):
            state = self._states.get(dep)
            if state is None:
                raise ValueError(f"{pending.label} depends on future {dep}, which this client does not know")
            self._dependents.setdefault(dep, set()).add(pending.key)
            state.on_done(functools.partial(self._dependency_done, dep))

    def _dependency_done(self, dep: str) -> None:
        release: list[_Pending] = []
        with self._lock:
            state = self._states[dep]
            for key in self._dependents.pop(dep, set()):
                pending = self._waiting.get(key)
                if pending is None:
                    continue
                if state.status != "finished":
                    del self._waiting[key]
                    exc = state.exception or RuntimeError(f"dependency {dep} was {state.status}")
                    self._states[key].fail(exc, state.traceback)
                    continue
                pending.deps.discard(dep)
                if not pending.deps:
                    release.append(self._waiting.pop(key))
        for p in release:
            try:
                args = replace_leaves(p.args, Future, self._argument_for)
                call = Call(p.key, p.label, self._dumps(args, f"argument of {p.label}"), p.retries)
                self._publish(p.fn, [call], p.resource, 1)
            except Exception as exc:
                self._states[p.key].fail(exc)

    def _argument_for(self, future: Future) -> Any:
        """What stands for a finished future inside another call's arguments."""
        if future.key in self._scattered:
            return BlobArg(self._scattered[future.key])
        if future.key in self._refs:
            return LakeArg(self._refs[future.key])
        return future._state.value()

    def _queue_for(self, resource: str | None) -> Any:
        queue = task_queue(self.config, resource)
        if resource not in self._declared:
            queue(self._conn.default_channel).declare()
            self._declared.add(resource)
        return queue

    def _publish(self, fn: FunctionRef, calls: list[Call], resource: str | None, batch_size: int) -> None:
        with self._lock:
            queue = self._queue_for(resource)
            for start in range(0, len(calls), batch_size):
                batch = tuple(calls[start : start + batch_size])
                msg_id = batch[0].key if len(batch) == 1 else f"batch-{uuid.uuid4().hex}"
                envelope = TaskEnvelope(msg_id, self._env, fn, batch, self.reply_to, self.config.lake_url)
                self._messages[msg_id] = _Sent(
                    [c.key for c in batch], resource, envelope if self._local is not None else None
                )
                for c in batch:
                    self._inflight[c.key] = msg_id
                self._send(envelope, queue)

    def _send(self, envelope: TaskEnvelope, queue: Any) -> None:
        first = envelope.calls[0].label
        self._app.send_task(
            TASK_NAME,
            args=[envelope.encode(self.config.secret)],
            task_id=envelope.id,
            queue=queue,
            headers={REPLY_HEADER: self.reply_to},
            connection=self._conn,
            argsrepr=first if len(envelope.calls) == 1 else f"{len(envelope.calls)} calls: {first} ...",
            kwargsrepr="{}",
            shadow=first.split("(", 1)[0],
        )

    def _put_blob(self, data: bytes, digest: str) -> str:
        with self._lock:
            if digest not in self._blobs:
                put_blob(self._conn, self.config.queue_prefix, data, digest, self.config.results_expire)
                self._blobs.add(digest)
        return digest

    # -- called by the collector thread ---------------------------------------------------------------------

    def results_queue(self, channel: Any) -> Any:
        """Declare (idempotently) and return this session's result queue, bound to the dead-letter exchange
        where the transport has one."""
        from kombu import Queue

        from .app import dead_letter_queues

        if self._transport.quorum:
            dead, mine = dead_letter_queues(self.config, self.reply_to)
            dead(channel).declare()
            return mine(channel)
        return Queue(self.reply_to, exchange="", routing_key=self.reply_to, durable=True)(channel)

    def _settle(self, outcome: Outcome, worker: str) -> None:
        with self._lock:
            state = self._states.get(outcome.key)
            self._landed(outcome.key)
            if outcome.ok and outcome.ref:
                self._refs[outcome.key] = outcome.ref
        if state is None or state.status != "pending":
            return  # a duplicate (redelivered task) or a cancelled future: the first outcome stands
        if outcome.ok:
            state.finish(_Lazy(lambda: self._load_value(outcome)))
        else:
            exc = pickle.loads(outcome.data) if outcome.data else RuntimeError("remote failure without details")
            if outcome.traceback:
                exc.__cause__ = RemoteTraceback(f"on worker {worker}:\n{outcome.traceback}")
            state.fail(exc, outcome.traceback)
        with self._lock:
            self._forget_if_done(outcome.key)  # nobody holds a handle any more

    def _load_value(self, outcome: Outcome) -> Any:
        import cloudpickle

        if outcome.ref is not None:
            from .lake import LakeRef, open_lake

            lake = open_lake(self.config.lake_url)
            assert lake is not None, "a result went to the data lake, but this client has no lake_url"
            return cloudpickle.loads(lake.get(LakeRef.from_dict(outcome.ref)))
        return cloudpickle.loads(outcome.data or b"")

    def _dead_lettered(self, task: TaskEnvelope, reason: str, count: Any) -> None:
        why = {
            "delivery_limit": f"it was delivered {count or 'too many'} times and its worker died every "
            "time (a crash, out of memory, or os._exit in the task?)",
            "rejected": "a worker rejected it (bad signature or malformed envelope)",
        }.get(reason, reason)
        for call in task.calls:
            with self._lock:
                self._landed(call.key)
                state = self._states.get(call.key)
            if state is not None:
                state.fail(TaskDeadLettered(f"task {call.label} [{call.key}] was dead-lettered: {why}"))

    def _landed(self, key: str) -> None:
        """The call ``key`` is no longer in flight; its message's record goes with its last call (under the
        lock)."""
        msg = self._inflight.pop(key, None)
        if msg is None:
            return
        sent = self._messages.get(msg)
        if sent is not None and all(k not in self._inflight for k in sent.keys):
            del self._messages[msg]

    def _retain(self, key: str) -> None:
        with self._lock:
            self._handles[key] += 1

    def _purge(self) -> None:
        """Forget the results of keys whose last Future handle is gone (called by the collector thread)."""
        with self._lock:
            while True:
                try:
                    key = self._released.get_nowait()
                except queue.Empty:
                    return
                self._handles[key] -= 1
                if self._handles[key] <= 0:
                    del self._handles[key]
                    self._forget_if_done(key)

    def _forget_if_done(self, key: str) -> None:
        state = self._states.get(key)
        if state is not None and state.status != "pending" and key not in self._handles:
            del self._states[key]
            self._refs.pop(key, None)
            self._scattered.pop(key, None)

    def _in_flight(self) -> bool:
        return bool(self._inflight)

    def _check_workers(self) -> None:
        """Fail the waiting futures of queues nobody consumes while workers of other envs are connected."""
        if self._local is not None:
            restarted, problem = self._local.supervise()
            if problem:
                self._fail_inflight(lambda resource: True, NoWorkerError(problem))
            elif restarted:
                with self._lock:
                    for msg_id, sent in self._messages.items():
                        if sent.envelope is not None:
                            log.info("republishing %s, which the dead local worker may have held", msg_id)
                            self._send(sent.envelope, self._queue_for(sent.resource))
            return
        if not self._transport.quorum:
            return
        with self._lock:
            resources = {self._messages[m].resource for m in set(self._inflight.values())}
        try:
            with connect(self.config) as conn:
                counts = {
                    r: task_queue(self.config, r)(conn.default_channel).queue_declare(passive=True)[2]
                    for r in resources
                }
        except Exception as exc:
            log.debug("worker check failed: %s", exc)
            return
        idle = [r for r, n in counts.items() if n == 0]
        if not idle:
            return
        replies = self._app.control.inspect(timeout=1.0).active_queues() or {}
        ours = f"{self.config.queue_prefix}."
        served_by = {w: sorted(q["name"] for q in qs if q["name"].startswith(ours)) for w, qs in replies.items()}
        served_by = {w: qs for w, qs in served_by.items() if qs}
        served = sorted({q for qs in served_by.values() for q in qs})
        names = ", ".join(queue_name(self.config, r) for r in idle)
        if not served:
            log.warning(
                "no worker is connected yet; tasks wait in %s (start one: mqexec worker --broker %s)",
                names,
                redact(self.config.broker_url or ""),
            )
            return
        error = NoWorkerError(
            f"no worker serves {names} (this client: Python {self._env['python']}, "
            f"env {self.config.env}); the {len(served_by)} connected worker(s) serve: "
            f"{', '.join(served)}"
        )
        log.error("%s", error)
        self._fail_inflight(lambda resource: resource in idle, error)

    def _fail_inflight(self, which: Callable[[str | None], bool], exc: BaseException) -> None:
        with self._lock:
            doomed = [k for k, m in self._inflight.items() if which(self._messages[m].resource)]
            for k in doomed:
                self._landed(k)
        for k in doomed:
            state = self._states.get(k)
            if state is not None:
                state.fail(exc)

    def _close_local(self) -> None:
        if self._local is not None:
            self._local.close()
            self._local = None


def _futures_in(obj: Any) -> set[str]:
    keys: set[str] = set()
    replace_leaves(obj, Future, lambda f: keys.add(f.key))
    return keys
