"""The futures client: ``submit``/``map``/``gather``/``scatter``/``cancel``, as in ``distributed.Client``.

    Client.submit/map ──pickle fn (once per call site), args per call──▶ Ledger ──▶ Courier thread
        ──▶ task queue P.py3.11 ──▶ workers ──▶ results queue P.results.<session> ──▶ Courier
        ──▶ FutureState (first outcome per key wins) ──▶ Future.result()  (unpickled lazily, on first use)

Futures anywhere inside the arguments — lists, dicts, namedtuples, objects, dask graphs — stand for their
values: the call waits on the client until they are done and then goes out with their values (small ones
inline, big ones shipped once as blobs or read from the data lake by the worker).

    with mqexec.Client("amqp://user:pw@broker.example:5672/vhost") as client:   # or Client(): embedded default
        fut = client.submit(lambda x: x + 1, 41)
        fut.result()                                   # 42
        total = sum(client.gather(client.map(square, range(1000))))

One piece because: it is the public face of ``distributed.Client`` — what a user reads to know what
the client can do; its bookkeeping (``ledger.py``), broker I/O (``courier.py``), futures (``futures.py``) and
dask support (``adapters/dask.py``) live in their own modules, and every method here is a few lines over them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import logging
import pickle
import reprlib
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from concurrent.futures import Future as StdFuture
from dataclasses import dataclass
from typing import Any

from .broker import connect, redact
from .config import Config
from .errors import ConfigError, SerializationError
from .futures import Future, futures_of
from .ledger import CallRecord, Function, Ledger
from .topology import results_queue_name, task_queue_name
from .wire import Key, Ref, collecting, resolving, sha256

log = logging.getLogger("mqexec.client")
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 4


def _funcname(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


def _label(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    shown = ", ".join([_repr.repr(a) for a in args] + [f"{k}={_repr.repr(v)}" for k, v in kwargs.items()])
    text = f"{name}({shown})"
    return text if len(text) <= 80 else text[:77] + "...)"


def _check_key(key: Any) -> Key:
    if isinstance(key, str) or (isinstance(key, tuple) and all(isinstance(k, str | int | float) for k in key)):
        return key
    raise TypeError(f"a key must be a string or a tuple of strings and numbers, got {key!r}")


def _code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    """cloudpickle's reduction of a code object, keeping its file name (for remote tracebacks)."""
    from cloudpickle import cloudpickle as impl

    ctor, args = impl._code_reduce(code)
    return ctor, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


@functools.cache
def _pickler() -> type:
    """cloudpickle's pickler, keeping code objects' file names (made once)."""
    import cloudpickle

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table = collections.ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

    return Pickler


def _dumps(obj: Any, what: str) -> bytes:
    buf = io.BytesIO()
    try:
        _pickler()(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {what}: {type(exc).__name__}: {exc}") from None
    return buf.getvalue()


@dataclass(frozen=True)
class _Options:
    """How the calls of one submit/map are run (see :meth:`Client.submit`)."""

    pure: bool = True
    retries: int = 0
    resources: dict[str, float] | None = None
    batch_size: int = 1
    safe: bool | None = None
    cache: bool = False
    single: bool = False  #: a submit(): the courier may send it with other single calls of a fast function


class Client:
    """A connection to a broker (or the embedded default) that runs functions on mqexec workers.

    >>> client = Client("amqp://guest:guest@127.0.0.1:5672//")    # doctest: +SKIP
    >>> client.submit(sum, [1, 2, 3]).result()                     # doctest: +SKIP
    6

    Args:
        address: broker URL (``amqp://``, ``amqps://``; ``a;b;c`` for a cluster); None (and no
            ``MQEXEC_BROKER_URL``) starts the embedded default — local worker processes on a local broker, one
            per process, shared by every such client.
        **settings: any :class:`~mqexec.config.Config` field (``lake_url``, ``queue_prefix``, ``concurrency``,
            ``safe_results`` ...); ``n_workers`` is ``local_workers``.

    Raises:
        BrokerError: the broker cannot be reached or refused the login (within ``connect_timeout`` s).
        ConfigError: a setting is malformed (named, with what is wrong).
    """

    def __init__(self, address: str | None = None, *, n_workers: int | None = None, **settings: Any) -> None:
        from .app import make_app
        from .courier import Courier
        from .local import shared_cluster

        self.status = "connecting"
        cfg = Config.load(broker_url=address, local_workers=n_workers, **settings)
        self._local = None
        if cfg.broker_url is None:
            self._local = shared_cluster(cfg)
            cfg = self._local.client_config(cfg)
        self.config = cfg
        self._identity = cfg.signer()
        self.session = uuid.uuid4().hex[:16]
        self.reply_to = results_queue_name(cfg, self.session)
        self._ledger = Ledger(cfg.delivery_limit, cfg.lease_timeout)
        self._app = make_app(cfg, owner=self._identity)
        self._shipper = None
        if cfg.ship_code:
            from .codeship import Shipper

            self._shipper = Shipper()
        self._courier = Courier(self)
        try:
            self._courier.connect_first()
        except BaseException:
            self._release_local()
            raise
        self._courier.start()
        from .summary import Run

        self._run = Run(self)  # what close(summary=True) reports
        self._dask_default: Any = None
        self.status = "running"
        log.info(
            "client %s connected to %s (queue %s)", self.session, redact(cfg.broker_url or ""), task_queue_name(cfg)
        )

    # -- submitting ------------------------------------------------------------------------------------------

    def submit(
        self,
        fn: Callable[..., Any],
        *args: Any,
        key: Key | None = None,
        pure: bool = True,
        retries: int | None = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        label: str | None = None,
        safe: bool | None = None,
        cache: bool = False,
        workers: Any = None,
        allow_other_workers: bool = False,
        fifo_timeout: Any = None,
        **kwargs: Any,
    ) -> Future:
        """Run ``fn(*args, **kwargs)`` on a worker (``async def`` functions are awaited there); its :class:`Future`.

        >>> client.submit(lambda x: x + 1, 41).result()    # doctest: +SKIP
        42

        Args:
            key: the future's key (a string or a tuple); by default ``<name>-<hash of fn and arguments>``
                (``pure=True``: the same call gives the same future) or ``<name>-<uuid>`` (``pure=False``).
            retries: extra attempts on the worker if ``fn`` raises.
            priority: accepted for ``distributed`` compatibility; quorum queues (RabbitMQ 3.x) are FIFO.
            resources: e.g. ``{"GPU": 1}`` routes to workers started with ``--resources GPU=1``.
            label: a readable name for logs and Flower (default: the call, shortened).
            safe: unpickle the result through the allow-list (:func:`mqexec.allow`); default ``safe_results``.
            cache: memoize in the client's ``cache_url`` lake(s), keyed by the function's code and the arguments
                (a call run before, by anyone writing there, is not run again).
            workers, allow_other_workers, fifo_timeout: accepted for ``distributed`` compatibility; mqexec
                workers take tasks from a shared queue, so placement cannot be chosen (docs/compatibility.md).

        Raises:
            SerializationError: ``fn`` or an argument cannot be pickled (names which).
        """
        if workers is not None:
            warnings.warn(
                "mqexec cannot place a task on given workers (workers=...): any worker of the queue runs it",
                stacklevel=2,
            )
        keys = [_check_key(key)] if key is not None else None
        options = _Options(pure, retries or 0, resources, 1, safe, cache, single=True)
        return self._submit(fn, [(args, kwargs)], keys, None, [label] if label else None, options)[0]

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        key: str | list[Key] | None = None,
        pure: bool = True,
        retries: int | None = 0,
        priority: int = 0,
        resources: dict[str, float] | None = None,
        batch_size: int | None = None,
        labels: list[str] | None = None,
        safe: bool | None = None,
        cache: bool = False,
        workers: Any = None,
        allow_other_workers: bool = False,
        fifo_timeout: Any = None,
        **kwargs: Any,
    ) -> list[Future]:
        """``fn`` over the zipped iterables, one future per call.

        Small calls are batched into fewer broker messages (``batch_size``; default: about 200 messages per
        map, at most 50 calls each); each call keeps its own future. ``key``: a prefix of the keys (as in
        ``distributed``) or the list of keys. ``safe``, ``cache``: as for :meth:`submit`.

        >>> sum(client.gather(client.map(lambda x: x * x, range(1000))))    # doctest: +SKIP
        332833500
        """
        calls = [(tuple(args), dict(kwargs)) for args in zip(*iterables, strict=False)]
        keys = [_check_key(k) for k in key] if isinstance(key, list) else None
        if keys is not None and len(keys) != len(calls):
            raise ValueError(f"map got {len(keys)} keys for {len(calls)} calls")
        if batch_size is None:
            batch_size = max(1, min(50, -(-len(calls) // 200)))
        prefix = key if isinstance(key, str) else None
        options = _Options(pure, retries or 0, resources, batch_size, safe, cache)
        return self._submit(fn, calls, keys, prefix, labels, options)

    def _submit(
        self,
        fn: Callable[..., Any],
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        keys: list[Key] | None,
        prefix: str | None,
        labels: list[str] | None,
        options: _Options,
    ) -> list[Future]:
        if self.status != "running":
            raise RuntimeError(f"this client is {self.status}")
        if not callable(fn):
            raise TypeError(f"first argument must be callable, got {fn!r}")
        name = _funcname(fn)
        if options.cache:
            return self._submit_memoized(fn, name, calls, keys, prefix, labels, options)
        with collecting() as fn_deps:
            pickled = _dumps(fn, f"the function {name!r} ({fn!r})")
        function = self._function(pickled, name)
        resource = ",".join(sorted(options.resources)) if options.resources else None
        group = 0 if options.single else self._ledger.new_group()  # group 0: submit()s, which the courier may coalesce
        safe = self.config.safe_results if options.safe is None else options.safe
        futures: list[Future] = []
        for i, (args, kwargs) in enumerate(calls):
            with collecting() as deps:
                payload = _dumps((args, kwargs), f"the arguments of {name}() call {i}")
            if keys is not None:
                key = keys[i]
            else:
                token = sha256(f"{function.hash}:{function.code.blob if function.code else ''}".encode() + payload)
                key = f"{prefix or name}-{token[:32] if options.pure else uuid.uuid4().hex}"
            state, new = self._ledger.state(key)
            futures.append(Future(key, state, self))
            if not new:
                continue
            label = labels[i] if labels else _label(name, args, kwargs)
            deps_all = frozenset(deps | fn_deps)
            call = CallRecord(key, label, function, self._ref(payload), deps_all, options.retries, resource, group)
            call.batch, call.safe = options.batch_size, safe
            self._ledger.add(call)
        self._courier.wake()
        return futures

    def _submit_memoized(
        self,
        fn: Callable[..., Any],
        name: str,
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        keys: list[Key] | None,
        prefix: str | None,
        labels: list[str] | None,
        options: _Options,
    ) -> list[Future]:
        """``cache=True``: calls found in the cache are finished futures at once; the others run as a worker-side
        wrapper that stores their results (``mqexec.cache.Memoized``)."""
        from .cache import Cache

        if not self.config.cache_url:
            raise ConfigError("cache=True needs a cache: Client(cache_url='root://host//path') or MQEXEC_CACHE_URL")
        if futures_of([args_kwargs for args_kwargs in calls]):
            raise ValueError(f"cache=True memoizes {name}() by the values of its arguments: pass values, not futures")
        safe = self.config.safe_results if options.safe is None else options.safe
        plan = Cache(self.config.cache_url.split(",")).plan(fn, calls, safe=safe)
        futures: list[Future] = []
        plain = dataclasses.replace(options, cache=False)
        for i, (args, kwargs) in enumerate(calls):
            key = keys[i] if keys is not None else f"{prefix or name}-{plan.keys[i][:32]}"
            label = labels[i] if labels else _label(name, args, kwargs)
            if i in plan.refused:
                state, _ = self._ledger.state(key)
                state.fail(plan.refused[i])
                futures.append(Future(key, state, self))
                continue
            if i not in plan.hits:
                call = [((plan.keys[i], *args), kwargs)]
                futures += self._submit(plan.function, call, [key], None, [label], plain)
                continue
            state, new = self._ledger.state(key)
            if new:
                value = plan.hits[i]
                with self._ledger.lock:
                    self._ledger.values[key] = self._ref(_dumps(value, f"the cached result of {label}"))
                state.finish(value, f"{type(value).__module__}.{type(value).__qualname__}")
                self._ledger.counts["cache_hits"] += 1
            futures.append(Future(key, state, self))
        return futures

    def _function(self, pickled: bytes, name: str) -> Function:
        digest = sha256(pickled)
        ref = (
            Ref.inline(pickled) if len(pickled) <= self.config.inline_limit else self._courier.put_blob(pickled, digest)
        )
        code = None
        if self._shipper is not None:
            archive = self._shipper.current()
            if archive is not None:
                code = self._courier.put_blob(archive.data, archive.digest)
        return Function(digest, ref, name, code)

    def _ref(self, payload: bytes) -> Ref:
        if len(payload) <= self.config.arg_inline_limit:
            return Ref.inline(payload)
        return self._courier.put_blob(payload)

    # -- results -----------------------------------------------------------------------------------------------

    def gather(
        self, futures: Any, errors: str = "raise", direct: bool | None = None, asynchronous: bool | None = None
    ) -> Any:
        """The results of futures, in the same structure (a future, or lists/tuples/sets/dicts of them).

        Args:
            errors: ``"raise"`` re-raises the first error; ``"skip"`` leaves failed futures out.
            direct: accepted for ``distributed`` compatibility (results always come through the broker).
        """
        if errors not in ("raise", "skip"):
            raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
        __tracebackhide__ = True

        def one(x: Any) -> Any:
            if isinstance(x, Future):
                return x.result()
            if isinstance(x, dict):
                return {k: one(v) for k, v in x.items() if not _skipped(v)}
            if isinstance(x, list | tuple | set | frozenset):
                values = [one(v) for v in x if not _skipped(v)]
                return values if isinstance(x, set | frozenset) else type(x)(values)
            return x

        def _skipped(v: Any) -> bool:
            if errors == "skip" and isinstance(v, Future):
                v._wait(None)
                return v.status != "finished"
            return False

        return one(futures)

    def scatter(
        self,
        data: Any,
        workers: Any = None,
        broadcast: bool = False,
        direct: bool | None = None,
        hash: bool = True,
        timeout: Any = None,
        asynchronous: bool | None = None,
    ) -> Any:
        """Ship data to the workers once (content-addressed); returns futures to pass to tasks.

        A list, tuple or dict scatters each element (as ``distributed`` does); anything else becomes one future.
        Every worker can read every scattered value (``broadcast`` is therefore always true); values over
        ``arg_inline_limit`` are put on the broker once and cached by each worker, smaller ones travel inside the
        calls that use them.

        >>> big = client.scatter(np.arange(10**7))          # doctest: +SKIP
        >>> client.submit(np.sum, big).result()             # doctest: +SKIP
        """
        if isinstance(data, list | tuple):
            return type(data)(self._scatter_one(x, hash) for x in data)
        if isinstance(data, dict):
            return {k: self._scatter_one(v, hash) for k, v in data.items()}
        return self._scatter_one(data, hash)

    def _scatter_one(self, data: Any, hash: bool) -> Future:
        payload = _dumps(data, "the scattered data")
        key = f"{type(data).__name__}-{sha256(payload)[:32] if hash else uuid.uuid4().hex}"
        state, new = self._ledger.state(key)
        if new:
            ref = self._ref(payload)
            with self._ledger.lock:
                self._ledger.values[key] = ref
            state.finish(data, f"{type(data).__module__}.{type(data).__qualname__}")
        return Future(key, state, self)

    def cancel(
        self,
        futures: Any,
        asynchronous: bool | None = None,
        force: bool = False,
        reason: str | None = None,
        msg: str | None = None,
    ) -> bool:
        """Cancel futures: tasks not yet run are dropped by the workers, finished results are released, and
        calls waiting on them end cancelled too. Only this client's own tasks are affected. True if any was
        pending."""
        keys = [f.key for f in futures_of(futures)]
        any_pending, revoke = self._ledger.cancel(keys)
        if revoke:
            try:
                self._app.control.revoke(revoke)
            except Exception as exc:  # the workers then run them; their results are dropped
                log.warning("could not tell the workers to drop %d cancelled task(s): %s", len(revoke), exc)
        return any_pending

    def retry(self, futures: Any, asynchronous: bool | None = None) -> None:
        """Run failed futures' tasks again (as ``distributed``'s ``Client.retry``)."""
        if self._ledger.retry(f.key for f in futures_of(futures)):
            self._courier.wake()

    def _loader(self, data: bytes | None, ref: Ref, safe: bool) -> Callable[[], Any]:
        """How a result is unpickled on first use: fetched from the lake if it went there; through the
        allow-list if ``safe``."""

        def load() -> Any:
            raw = data if data is not None else self._from_lake(ref)
            if safe:
                from .safepickle import loads

                return loads(raw)
            import cloudpickle

            return cloudpickle.loads(raw)

        return load

    def _from_lake(self, ref: Ref) -> bytes:
        """A result a worker put into the data lake — read only from this client's own ``lake_url``: a worker
        cannot make the client fetch from (and send its grid credentials to) a host the worker chose."""
        from .lake import LakeRef, open_lake

        assert ref.lake is not None
        if not self.config.lake_url:
            raise SerializationError(
                f"a worker answered with a data-lake reference ({ref.lake.get('url')!r}), but this client has no "
                "lake_url: refused (set lake_url to read big results from your own lake)"
            )
        lake = open_lake(self.config.lake_url)
        assert lake is not None
        return bytes(lake.get(LakeRef.from_dict(ref.lake)))  # LakeError if the reference is not inside that lake

    def stats(self) -> dict[str, Any]:
        """What this session did so far, for a run summary: outcomes per worker and site, resends, dead letters.

        >>> client.stats()["by_worker"]          # doctest: +SKIP
        {'mqexec-py3.11-123@wn042': 512, ...}
        """
        with self._ledger.lock:
            return {
                "session": self.session,
                "counts": dict(self._ledger.counts),
                "by_worker": dict(self._ledger.by_worker),
                "by_site": dict(self._ledger.by_site),
                "in_flight": len(self._ledger.calls),
            }

    def wait_for_workers(self, n_workers: int = 1, timeout: float | None = None) -> list[str]:
        """Block until at least ``n_workers`` workers of this queue prefix answer a ping; their names.

        >>> client.wait_for_workers(2, timeout=60)     # doctest: +SKIP
        ['mqexec-py3.11-4242@wn042', 'mqexec-py3.11-4243@wn042']

        Raises:
            TimeoutError: fewer answered within ``timeout`` s (None: wait for ever), naming how many did.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            replies = self._app.control.ping(timeout=0.5) or []
            names = sorted(name for reply in replies for name in reply)
            if len(names) >= n_workers:
                return names
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(names)} of {n_workers} workers of queue prefix {self.config.queue_prefix!r} "
                    f"answered within {timeout:g} s"
                )

    # -- the call, again, here -----------------------------------------------------------------------------------

    def _local_call(self, future: Future) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        import cloudpickle

        with self._ledger.lock:
            call = self._ledger.finished_calls.get(future.key) or self._ledger.calls.get(future.key)
        if call is None:
            raise ValueError(f"this client no longer knows how {future.key!r} was computed")

        def data(ref: Ref) -> bytes:
            return ref.data if ref.data is not None else self._courier.blob_bytes(ref)

        def value(key: Key) -> Any:
            with self._ledger.lock:
                state = call.inputs.get(key) or self._ledger.states.get(key)
            if state is None:  # never wait on a state nobody will settle
                raise ValueError(f"this client no longer holds {key!r}, an argument of {future.key!r}")
            return Future(key, state, self).result()

        with resolving(value):
            fn = cloudpickle.loads(data(call.fn.ref))
            args, kwargs = cloudpickle.loads(data(call.args))
        return fn, args, kwargs

    def recreate_task_locally(self, future: Future) -> Any:
        """Run ``future``'s call here, in this process (for a debugger), and return its result."""
        fn, args, kwargs = self._local_call(future)
        return fn(*args, **kwargs)

    def recreate_error_locally(self, future: Future) -> None:
        """Run a failed future's call here, so its exception is raised in this process (``%debug`` works)."""
        future._wait(None)
        if future.status != "error":
            raise ValueError(f"{future.key!r} did not fail (status {future.status})")
        fn, args, kwargs = self._local_call(future)
        fn(*args, **kwargs)

    def get_executor(self, **kwargs: Any) -> Executor:
        """A ``concurrent.futures.Executor`` that submits to this client (``kwargs`` go to every submit)."""
        return _ClientExecutor(self, kwargs)

    # -- dask --------------------------------------------------------------------------------------------------

    def get(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        """Compute a dask graph on the workers: a dask scheduler, ``dask.compute(x, scheduler=client.get)``."""
        from .adapters.dask import get

        return get(self, dsk, keys, **kwargs)

    def compute(self, collections: Any, sync: bool = False, **kwargs: Any) -> Any:
        """Submit dask collections (also inside lists, tuples and dicts); futures, or values if ``sync``."""
        from .adapters.dask import compute

        return compute(self, collections, sync=sync, **kwargs)

    def persist(self, collections: Any, **kwargs: Any) -> Any:
        """Start computing dask collections; the same collections, now backed by futures (``wait`` on them)."""
        from .adapters.dask import persist

        return persist(self, collections, **kwargs)

    # -- life cycle ----------------------------------------------------------------------------------------------

    def close(self, timeout: Any = None, summary: bool = False) -> None:
        """Cancel what is still pending, delete this session's queues and release the embedded workers;
        ``summary``: first print what this client ran (see :mod:`mqexec.summary`; also ``summary.last()``)."""
        if self.status in ("closing", "closed"):
            return
        if summary:
            self._run.finish(show=True)
        self.status = "closing"
        for state in self._ledger.pending_states():
            state.cancel("the client was closed")
        self._courier.stop()
        self._courier.join(timeout=10)
        self._delete_queues()
        self._release_local()
        self.status = "closed"
        log.info("client %s closed", self.session)

    shutdown = close

    def _delete_queues(self) -> None:
        names = [self.reply_to, *self._courier.blob_queues()]
        try:
            with connect(self.config) as conn:
                channel = conn.channel()
                for name in names:
                    channel.queue_delete(name)
        except Exception as exc:
            log.warning(
                "client %s could not delete its %d queue(s) (%s ...): %s — the broker deletes them %g s "
                "after this client went",
                self.session,
                len(names),
                names[0],
                exc,
                self.config.session_expire,
            )

    def _release_local(self) -> None:
        if self._local is not None:
            self._local.release()
            self._local = None

    def __enter__(self) -> Client:
        """Inside ``with Client(...)``, dask computes on this client (as with ``distributed.Client``)."""
        import importlib.util

        if importlib.util.find_spec("dask") is not None:
            from .adapters.dask import default_scheduler

            self._dask_default = default_scheduler(self)
            self._dask_default.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dask_default is not None:
            self._dask_default.__exit__(None, None, None)
            self._dask_default = None
        self.close()

    def __repr__(self) -> str:
        return f"<mqexec.Client {redact(self.config.broker_url or '')} session={self.session} {self.status}>"

    def _repr_html_(self) -> str:
        import html

        return (
            f"<strong>mqexec.Client</strong> {html.escape(redact(self.config.broker_url or 'embedded'))} "
            f"· queue {html.escape(task_queue_name(self.config))} · session {self.session} · {self.status}"
        )


class _ClientExecutor(Executor):
    """``client.get_executor()``: the standard library's executor interface on top of a client."""

    def __init__(self, client: Client, kwargs: dict[str, Any]) -> None:
        self._client, self._kwargs = client, kwargs
        self._futures: set[Future] = set()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> StdFuture[Any]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        fut = self._client.submit(fn, *args, **{"pure": False, **self._kwargs, **kwargs})
        self._futures.add(fut)
        std: StdFuture[Any] = StdFuture()
        std.set_running_or_notify_cancel()

        def done() -> None:
            self._futures.discard(fut)
            if fut.status == "finished":
                try:
                    std.set_result(fut.result())
                except BaseException as exc:  # a value that cannot be loaded
                    std.set_exception(exc)
            elif fut.status == "error":
                std.set_exception(fut._state.exception)
            else:
                std.set_exception(fut._state.exception or RuntimeError(f"{fut.key} was {fut.status}"))

        fut._state.on_done(done)
        return std

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            self._client.cancel(list(self._futures))
        if wait:
            from .futures import wait as wait_for

            wait_for(list(self._futures))
