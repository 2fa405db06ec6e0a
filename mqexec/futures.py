"""Futures: a handle (:class:`Future`) over a state shared by every handle of the same key.

Modelled on ``concurrent.futures`` and ``distributed``: the user-facing methods (``result``, ``exception``,
``traceback``, ``done``, ``cancel``, ``add_done_callback``) live on :class:`Future`; the methods only the client
calls (``finish``, ``fail``, ``cancel``) live on :class:`FutureState`, which keeps the first outcome for a key and
ignores any later one (a task run twice is counted once, and never fires callbacks twice). A callback that raises
is logged and the others still run (as ``concurrent.futures._base._invoke_callbacks`` does).

    fut = client.submit(pow, 2, 10)
    fut.result(timeout="30s")                   # 1024
    for f in as_completed(client.map(inc, range(10))): print(f.result())

One piece because: like ``concurrent/futures/_base.py``, the state, the handle and the functions that wait
on handles (``wait``, ``as_completed``, ``futures_of``) share one locking discipline that is easiest to check
in one place.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple

from .config import parse_duration
from .wire import dependency, noticed

if TYPE_CHECKING:
    import types

    from .client import Client

log = logging.getLogger("mqexec.client")
_UNSET: Any = object()


class Lazy:
    """A value that is unpickled (or fetched from the data lake) only when someone asks for it."""

    __slots__ = ("load",)

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load = load


class FutureState:
    """The state of one key: ``pending`` → ``finished`` | ``error`` | ``cancelled``; set once, under a lock."""

    __slots__ = ("_callbacks", "_cond", "_value", "exception", "status", "traceback", "type_name")

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.status = "pending"
        self._value: Any = _UNSET
        self.exception: BaseException | None = None
        self.traceback: types.TracebackType | None = None
        self.type_name = ""
        self._callbacks: list[Callable[[], None]] = []

    def _settle(self, status: str, value: Any, exception: BaseException | None) -> bool:
        with self._cond:
            if self.status != "pending":
                return False
            self.status, self._value, self.exception = status, value, exception
            self.traceback = exception.__traceback__ if exception is not None else None
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for cb in callbacks:
            _invoke(cb)
        return True

    def finish(self, value: Any, type_name: str = "") -> bool:
        """Record the value (a :class:`Lazy` is loaded on first use); False if the state was already set."""
        self.type_name = type_name or self.type_name
        return self._settle("finished", value, None)

    def fail(self, exception: BaseException) -> bool:
        return self._settle("error", _UNSET, exception)

    def cancel(self, reason: str = "") -> bool:
        return self._settle("cancelled", _UNSET, CancelledError(reason) if reason else CancelledError())

    def reset(self) -> bool:
        """Back to ``pending`` after an error (``Future.retry``); False if it did not fail."""
        with self._cond:
            if self.status != "error":
                return False
            self.status, self.exception, self.traceback, self._value = "pending", None, None, _UNSET
            return True

    def wait(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.status != "pending", timeout)

    def value(self) -> Any:
        if isinstance(self._value, Lazy):
            with self._cond:
                if isinstance(self._value, Lazy):
                    self._value = self._value.load()
        return self._value

    def on_done(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` once the state is settled (at once if it is); it runs on the settling thread."""
        with self._cond:
            if self.status == "pending":
                self._callbacks.append(cb)
                return
        _invoke(cb)


def _invoke(cb: Callable[[], None]) -> None:
    try:
        cb()
    except Exception:
        log.exception("a done-callback raised (the other callbacks still run): %r", cb)


_callback_thread: ThreadPoolExecutor | None = None
_callback_lock = threading.Lock()


def _in_callback_thread(fn: Callable[[], None]) -> None:
    """User callbacks run on one thread of their own, so a slow one never holds up results (as distributed)."""
    global _callback_thread
    with _callback_lock:
        if _callback_thread is None:
            _callback_thread = ThreadPoolExecutor(1, thread_name_prefix="mqexec-callback")
        _callback_thread.submit(_invoke, fn)


def _seconds(timeout: float | str | None) -> float | None:
    return parse_duration(timeout) if isinstance(timeout, str) else timeout


class Future:
    """The handle of one task's result, as in ``distributed``: ``key``, ``status``, ``result()`` ...

    >>> fut = client.submit(lambda x: x + 1, 41)     # doctest: +SKIP
    >>> fut.result(timeout="10s")                     # doctest: +SKIP
    42

    Inside the arguments of another call (in a list, an object, a dask graph) a future stands for its value.
    """

    __slots__ = ("__weakref__", "_client", "_state", "key")

    def __init__(self, key: Any, state: FutureState, client: Client | None) -> None:
        self.key = key
        self._state = state
        self._client = client
        if client is not None:
            client._ledger.retain(key)

    def __del__(self) -> None:
        self.release()

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error`` or ``cancelled``."""
        return self._state.status

    @property
    def client(self) -> Client | None:
        return self._client

    @property
    def type(self) -> Any:
        """The type of the result once finished (the class where it is importable here, else its name)."""
        name = self._state.type_name
        if not name:
            return None
        import sys

        module, _, qual = name.rpartition(".")
        obj: Any = sys.modules.get(module)
        for attr in qual.split("."):
            obj = getattr(obj, attr, None)
        return obj if isinstance(obj, type) else name

    def done(self) -> bool:
        return self._state.status != "pending"

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def _wait(self, timeout: float | str | None) -> None:
        seconds = _seconds(timeout)
        if not self._state.wait(seconds):
            raise TimeoutError(f"{self.key} not done after {seconds:g} s")

    def result(self, timeout: float | str | None = None) -> Any:
        """The value; a remote exception is raised with its original type and the remote frames.

        Args:
            timeout: seconds, or a duration such as ``"10s"`` or ``"500 ms"``.

        Raises:
            TimeoutError: not done within ``timeout``.
            concurrent.futures.CancelledError: the future was cancelled.
        """
        __tracebackhide__ = True
        self._wait(timeout)
        state = self._state
        if state.exception is not None:
            raise state.exception.with_traceback(state.traceback)
        return state.value()

    def exception(self, timeout: float | str | None = None) -> BaseException | None:
        """The exception of a failed task (None if it did not fail)."""
        self._wait(timeout)
        return self._state.exception if self._state.status == "error" else None

    def traceback(self, timeout: float | str | None = None) -> types.TracebackType | None:
        """A traceback object of the failed task, its frames the remote ones (None if it did not fail)."""
        self._wait(timeout)
        return self._state.traceback if self._state.status == "error" else None

    def cancel(self) -> bool:
        """Cancel: a task not yet run is dropped by the workers; a finished result is released."""
        if self._client is not None:
            return self._client.cancel([self])
        return self._state.cancel()

    def retry(self) -> None:
        """Run a failed task again (as ``distributed``'s ``Future.retry``)."""
        if self._client is not None:
            self._client.retry([self])

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` once the future is done (success, error or cancel), on a callback thread."""
        self._state.on_done(lambda: _in_callback_thread(lambda: fn(self)))

    def release(self) -> None:
        """Drop this handle; the client forgets the result when the last handle of its key is gone."""
        client, self._client = self._client, None
        if client is not None:
            client._ledger.released(self.key)

    def __repr__(self) -> str:
        kind = self._state.type_name.rpartition(".")[2]
        return f"<Future: {self.status}{f', type: {kind}' if kind else ''}, key: {self.key}>"

    def _repr_html_(self) -> str:
        import html

        kind = html.escape(self._state.type_name or "")
        return (
            f"<strong>Future: {html.escape(str(self.key))}</strong> <span>status: {self.status}"
            f"{f', type: {kind}' if kind else ''}</span>"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        noticed(self.key)
        return (dependency, (self.key,))

    def __dask_tokenize__(self) -> tuple[str, Any]:
        return ("mqexec.Future", self.key)

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Future) and other.key == self.key


def futures_of(obj: Any) -> list[Future]:
    """The futures inside ``obj``: a future, containers of them, or a dask collection (persisted ones).

    >>> futures_of([fut, {"a": (fut2,)}])          # doctest: +SKIP
    [<Future ...>, <Future ...>]
    """
    if hasattr(obj, "__dask_graph__"):
        from .adapters.dask import futures_of as in_collection

        return list(in_collection(obj))
    found: dict[int, Future] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, Future):
            found.setdefault(id(item), item)
        elif isinstance(item, list | tuple | set | frozenset):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dask_graph__"):
            found.update((id(f), f) for f in futures_of(item))
    return list(found.values())


def fire_and_forget(obj: Any) -> None:
    """Let the tasks of these futures run to completion even when no handle is kept (as ``distributed``'s): mqexec
    never withdraws a task whose handles are released, so this only documents the intent.

    >>> fire_and_forget(client.submit(write_report, run))      # doctest: +SKIP
    """
    futures_of(obj)


class DoneAndNotDoneFutures(NamedTuple):
    done: set[Future]
    not_done: set[Future]


FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"


def wait(fs: Any, timeout: float | str | None = None, return_when: str = ALL_COMPLETED) -> DoneAndNotDoneFutures:
    """Wait for futures (a future, a list, or a collection holding futures), as ``distributed.wait``.

    >>> done, not_done = wait(futures, timeout="1 min", return_when=FIRST_COMPLETED)   # doctest: +SKIP

    Raises:
        TimeoutError: the condition is not met within ``timeout``.
    """
    futures = {fs} if isinstance(fs, Future) else set(futures_of(fs))
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED, got {return_when!r}")
    event = threading.Event()

    def satisfied() -> bool:
        done = [f for f in futures if f.done()]
        if return_when == FIRST_COMPLETED:
            return bool(done) or not futures
        if return_when == FIRST_EXCEPTION and any(f.status == "error" for f in done):
            return True
        return len(done) == len(futures)

    for f in futures:
        f._state.on_done(event.set)
    seconds = _seconds(timeout)
    deadline = None if seconds is None else time.monotonic() + seconds
    while not satisfied():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"{sum(not f.done() for f in futures)} of {len(futures)} futures not done after {seconds:g} s"
            )
        event.wait(remaining)
        event.clear()
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, futures - done)


class as_completed(Iterator[Any]):
    """Iterate over futures in the order they finish; more can be added while iterating.

    >>> for fut, value in as_completed(futures, with_results=True): ...   # doctest: +SKIP
    >>> for batch in as_completed(futures).batches(): ...                 # doctest: +SKIP

    Args:
        futures: the futures to watch (a future added twice is yielded twice, as in distributed).
        with_results: yield ``(future, result)``; an errored future raises its exception when reached unless
            ``raise_errors=False``, which yields ``(future, (type, exception, traceback))``; a cancelled one
            yields ``(future, CancelledError)``.
        timeout: seconds (or ``"10s"``) from now before ``next()`` raises ``TimeoutError``.
    """

    def __init__(
        self,
        futures: Iterable[Future] = (),
        with_results: bool = False,
        raise_errors: bool = True,
        *,
        timeout: float | str | None = None,
    ) -> None:
        self._ready: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting: Counter[Future] = Counter()
        self._n_ready = 0
        self.with_results = with_results
        self.raise_errors = raise_errors
        seconds = _seconds(timeout)
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self.update(futures)

    def add(self, future: Future) -> None:
        """Watch one more future."""
        if not isinstance(future, Future):
            raise TypeError(f"Input must be a future, got {future!r}")
        with self._lock:
            self._waiting[future] += 1
        future._state.on_done(lambda: self._done(future))

    def update(self, futures: Iterable[Future]) -> None:
        """Watch more futures."""
        for f in futures:
            self.add(f)

    def _done(self, future: Future) -> None:
        with self._lock:
            self._waiting[future] -= 1
            if self._waiting[future] <= 0:
                del self._waiting[future]
            self._n_ready += 1
        self._ready.put(future)

    def count(self) -> int:
        """How many futures are still to be yielded (running or ready)."""
        with self._lock:
            return sum(self._waiting.values()) + self._n_ready

    def is_empty(self) -> bool:
        return self.count() == 0

    def has_ready(self) -> bool:
        """True if a finished future is waiting to be yielded."""
        return not self._ready.empty()

    def clear(self) -> None:
        """Stop watching everything."""
        with self._lock:
            self._waiting.clear()
            while not self._ready.empty():
                self._ready.get_nowait()
            self._n_ready = 0

    def __repr__(self) -> str:
        with self._lock:
            return f"<as_completed: waiting={sum(self._waiting.values())} done={self._n_ready}>"

    def __iter__(self) -> as_completed:
        return self

    def _take(self, block: bool) -> Future:
        if not block:
            future = self._ready.get_nowait()
        else:
            while True:
                if self.is_empty():
                    raise StopIteration
                remaining = None if self._deadline is None else self._deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{self.count()} futures not done in time")
                try:
                    future = self._ready.get(timeout=0.1 if remaining is None else min(remaining, 0.1))
                    break
                except queue.Empty:
                    continue
        with self._lock:
            self._n_ready -= 1
        return future

    def _item(self, future: Future) -> Any:
        if not self.with_results:
            return future
        if future.status == "cancelled":
            return future, future._state.exception
        if future.status == "error":
            exc = future._state.exception
            assert exc is not None
            if self.raise_errors:
                raise exc.with_traceback(future._state.traceback)
            return future, (type(exc), exc, future._state.traceback)
        return future, future.result()

    def __next__(self) -> Any:
        return self._item(self._take(block=True))

    next = __next__

    def next_batch(self, block: bool = True) -> list[Any]:
        """Every future done by now (waiting for at least one if ``block``)."""
        batch = [next(self)] if block else []
        while self.has_ready():
            try:
                batch.append(self._item(self._take(block=False)))
            except queue.Empty:
                break
        return batch

    def batches(self) -> Iterator[list[Any]]:
        """Yield lists of whatever has finished, as soon as something has."""
        while True:
            try:
                yield self.next_batch(block=True)
            except StopIteration:
                return
