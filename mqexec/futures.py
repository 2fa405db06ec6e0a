"""Futures: a handle (:class:`Future`) over a state shared by every handle of the same key.

Modelled on ``concurrent.futures`` and ``distributed``: the user-facing methods (``result``, ``exception``,
``traceback``, ``done``, ``cancel``, ``add_done_callback``) live on :class:`Future`; the methods only the
client calls (``finish``, ``fail``) live on :class:`FutureState`, which keeps the first outcome for a key and
ignores any later one (a redelivered task's second result is dropped here, and never fires callbacks twice).

    fut = client.submit(pow, 2, 10)
    fut.result(timeout=30)                      # 1024
    for f in as_completed(client.map(inc, range(10))): print(f.result())
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from .client import Client

_UNSET: Any = object()


class FutureState:
    """The state of one key: ``pending`` → ``finished`` | ``error`` | ``cancelled``; set once, under a lock."""

    __slots__ = ("_callbacks", "_cond", "_value", "exception", "status", "traceback")

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.status = "pending"
        self._value: Any = _UNSET
        self.exception: BaseException | None = None
        self.traceback: str = ""
        self._callbacks: list[Callable[[], None]] = []

    def _settle(self, status: str, value: Any, exception: BaseException | None, tb: str) -> bool:
        with self._cond:
            if self.status != "pending":
                return False
            self.status, self._value, self.exception, self.traceback = status, value, exception, tb
            callbacks, self._callbacks = self._callbacks, []
            self._cond.notify_all()
        for cb in callbacks:
            cb()
        return True

    def finish(self, value: Any) -> bool:
        """Record the value (a zero-argument loader is called lazily on first use); False if already set."""
        return self._settle("finished", value, None, "")

    def fail(self, exception: BaseException, tb: str = "") -> bool:
        return self._settle("error", _UNSET, exception, tb)

    def cancel(self) -> bool:
        return self._settle("cancelled", _UNSET, CancelledError(), "")

    def wait(self, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.status != "pending", timeout)

    def value(self) -> Any:
        if isinstance(self._value, _Lazy):
            with self._cond:
                if isinstance(self._value, _Lazy):
                    self._value = self._value.load()
        return self._value

    def on_done(self, cb: Callable[[], None]) -> None:
        with self._cond:
            if self.status == "pending":
                self._callbacks.append(cb)
                return
        cb()


class _Lazy:
    """A value that is unpickled (or fetched from the data lake) only when someone asks for it."""

    __slots__ = ("load",)

    def __init__(self, load: Callable[[], Any]) -> None:
        self.load = load


class Future:
    """The handle of one task's result, as in ``distributed``: ``key``, ``status``, ``result()`` ...

    >>> fut = client.submit(lambda x: x + 1, 41)     # doctest: +SKIP
    >>> fut.result()                                  # doctest: +SKIP
    42
    """

    __slots__ = ("_client", "_state", "key")

    def __init__(self, key: str, state: FutureState, client: Client | None) -> None:
        self.key = key
        self._state = state
        self._client = client
        if client is not None:
            client._retain(key)

    def __del__(self) -> None:
        self.release()

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error`` or ``cancelled``."""
        return self._state.status

    @property
    def client(self) -> Client | None:
        return self._client

    def done(self) -> bool:
        return self._state.status != "pending"

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def _wait(self, timeout: float | None) -> None:
        if not self._state.wait(timeout):
            raise TimeoutError(f"{self.key} not done after {timeout} s")

    def result(self, timeout: float | None = None) -> Any:
        """The value; re-raises a remote exception with its original type (remote traceback as cause).

        Raises:
            TimeoutError: not done within ``timeout`` seconds.
            concurrent.futures.CancelledError: the future was cancelled.
        """
        self._wait(timeout)
        if self._state.exception is not None:
            raise self._state.exception
        return self._state.value()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        if self.cancelled():
            raise CancelledError(self.key)
        return self._state.exception

    def traceback(self, timeout: float | None = None) -> Any:
        """A traceback object for the error (its ``__cause__`` chain shows the remote one), or None."""
        exc = self.exception(timeout)
        return None if exc is None else exc.__traceback__ or _traceback_of(exc)

    def cancel(self) -> bool:
        """Cancel: a task not yet run is dropped (revoked on the workers); True if the future was pending."""
        if self._client is not None:
            return self._client.cancel([self])
        return self._state.cancel()

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` once the future is done (right away if it is); from the client's thread."""
        self._state.on_done(lambda: fn(self))

    def release(self) -> None:
        """Drop this handle; the client forgets the result when the last handle of its key is gone."""
        client, self._client = self._client, None
        if client is not None:
            client._released.put(self.key)

    def __repr__(self) -> str:
        return f"<Future: {self.status}, key: {self.key}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_FutureKey, (self.key,))

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Future) and other.key == self.key


class _FutureKey(str):
    """What a future pickles to where it stands inside another task's arguments (only for key tokens)."""


def _traceback_of(exc: BaseException) -> Any:
    try:
        raise exc
    except BaseException as raised:
        return raised.__traceback__


class DoneAndNotDoneFutures(NamedTuple):
    done: set[Future]
    not_done: set[Future]


FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"


def wait(fs: Iterable[Future], timeout: float | None = None, return_when: str = ALL_COMPLETED) -> DoneAndNotDoneFutures:
    """Wait for futures, as ``distributed.wait``: raises ``TimeoutError`` if the condition is not met in time.

    >>> done, not_done = wait(futures, return_when=FIRST_COMPLETED)   # doctest: +SKIP
    """
    futures = set(fs)
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(
            f"return_when must be one of FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED, got {return_when!r}"
        )
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
    deadline = None if timeout is None else time.monotonic() + timeout
    while not satisfied():
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(
                f"{sum(not f.done() for f in futures)} of {len(futures)} futures not done after {timeout} s"
            )
        event.wait(remaining)
        event.clear()
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, futures - done)


class as_completed(Iterator[Any]):
    """Iterate over futures in the order they finish; more can be added while iterating.

    >>> for fut, value in as_completed(futures, with_results=True): ...   # doctest: +SKIP

    Args:
        futures: the futures to watch.
        with_results: yield ``(future, result)`` pairs; an errored future raises its exception when reached
            (unless ``raise_errors=False``, which yields the exception as the result).
        timeout: seconds before ``TimeoutError`` is raised if the iteration is not over.
    """

    def __init__(
        self,
        futures: Iterable[Future] = (),
        with_results: bool = False,
        timeout: float | None = None,
        raise_errors: bool = True,
    ) -> None:
        self._queue: queue.SimpleQueue[Future] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._count = 0
        self.with_results = with_results
        self.raise_errors = raise_errors
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.update(futures)

    def add(self, future: Future) -> None:
        with self._lock:
            self._count += 1
        future._state.on_done(lambda: self._queue.put(future))

    def update(self, futures: Iterable[Future]) -> None:
        for f in futures:
            self.add(f)

    def count(self) -> int:
        """How many futures are still to be yielded."""
        return self._count

    def is_empty(self) -> bool:
        return self._count == 0

    def __iter__(self) -> as_completed:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if self._count == 0:
                raise StopIteration
        remaining = None if self._deadline is None else max(self._deadline - time.monotonic(), 0)
        try:
            future = self._queue.get(timeout=remaining)
        except queue.Empty:
            raise TimeoutError(f"{self._count} futures not done in time") from None
        with self._lock:
            self._count -= 1
        if not self.with_results:
            return future
        if future.status == "error" and not self.raise_errors:
            return future, future.exception()
        return future, future.result()

    def next_batch(self, block: bool = True) -> list[Any]:
        """Every future done by now (at least one if ``block``)."""
        batch = [next(self)] if block and not self.is_empty() else []
        while not self._queue.empty():
            batch.append(next(self))
        return batch
