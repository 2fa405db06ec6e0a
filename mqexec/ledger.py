"""The client's bookkeeping per key: futures, calls on their way, leases, values for dependents, handles.

    Client.submit ──add()──▶ waiting (on futures in its arguments) ──▶ outbox ──take_outbox()──▶ Courier
    Courier ──sent()──▶ message on the broker ──leased()──▶ held by a worker ──outcome()──▶ FutureState
               ▲              │ lapsed() / lost() / released(): sent again (attempts counted)
               └──────────────┘

One lock guards it all; every method is short and never does I/O, so the client's user threads and its courier
thread (the only one talking to the broker) never wait on each other for long. A key's state is forgotten when
its last :class:`~mqexec.futures.Future` handle is gone and it is settled (memory stays flat in long runs).

At-least-once with a lease: a worker acknowledges a task message when it takes it and then says, every
``lease_interval``, which messages it holds. A message held by nobody for ``lease_timeout`` (its worker died, or
its connection is gone for good) is sent again; a message whose worker process died running it ("lost") is sent
again at once, each of its calls alone, so one poison call cannot take its batch-mates down with it. A call
started ``delivery_limit`` times whose worker died every time fails with :class:`TaskDeadLettered`. The first
outcome of a key settles it; later ones (a task that ran twice) are dropped.
"""

from __future__ import annotations

import functools
import itertools
import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .errors import TaskDeadLettered
from .futures import FutureState
from .wire import Key, Ref

log = logging.getLogger("mqexec.client")


@dataclass(frozen=True)
class Function:
    """A pickled function as the calls refer to it: its hash, how it travels, and its readable name."""

    hash: str
    ref: Ref
    name: str
    code: Ref | None = None  #: the analysis's own modules, shipped as a source archive


@dataclass
class CallRecord:
    """One call, from submit until its outcome: what to send, and what it waits for."""

    key: Key
    label: str
    fn: Function
    args: Ref
    deps: frozenset[Key]
    retries: int = 0
    resource: str | None = None
    group: int = 0  #: calls of one map() share messages (up to ``batch`` each); 0: submit()s, coalesced if fast
    batch: int = 1
    safe: bool = False  #: its result is unpickled through the allow-list (safepickle.py)
    waiting: set[Key] = field(default_factory=set)
    message: str | None = None
    attempts: int = 0  #: times it was started and its worker died
    submitted: float = field(default_factory=time.monotonic)
    inputs: dict[Key, FutureState] = field(default_factory=dict)  #: settled, its arguments' futures (recreate_*)


@dataclass
class MessageRecord:
    """A task message on its way: its calls, and who holds it (``lease_until`` None: still in the queue)."""

    id: str
    keys: list[Key]
    resource: str | None
    sent_at: float
    lease_until: float | None = None
    worker: str = ""


class Ledger:
    """Per-key state of one client session (see the module docstring). Thread-safe."""

    def __init__(self, delivery_limit: int, lease_timeout: float) -> None:
        self.lock = threading.RLock()
        self.delivery_limit = delivery_limit
        self.lease_timeout = lease_timeout
        self.states: dict[Key, FutureState] = {}
        self.calls: dict[Key, CallRecord] = {}
        self.messages: dict[str, MessageRecord] = {}
        self.values: dict[Key, Ref] = {}  #: how a finished key's value reaches a dependent call
        self.finished_calls: dict[Key, CallRecord] = {}  #: settled calls, for recreate_task_locally
        self._dependents: dict[Key, set[Key]] = {}
        self._needed: Counter[Key] = Counter()  #: unsettled calls whose arguments hold the key's future
        self._outbox: deque[CallRecord] = deque()
        self._handles: Counter[Key] = Counter()
        self._released: queue.SimpleQueue[Key] = queue.SimpleQueue()  #: filled by Future.release / __del__
        self._groups = itertools.count(1)
        self.counts: Counter[str] = Counter()  #: messages, resent, lost, lapsed, duplicates, dead, cache_hits
        self.by_worker: Counter[str] = Counter()  #: outcomes received per worker
        self.by_site: Counter[str] = Counter()  #: ... per grid site (workers outside a job: "")

    # -- keys and handles --------------------------------------------------------------------------------------

    def state(self, key: Key) -> tuple[FutureState, bool]:
        """The state of ``key`` and whether it was made now (a cancelled or broker-failed key starts afresh)."""
        with self.lock:
            state = self.states.get(key)
            if state is not None and state.status != "cancelled":
                return state, False
            state = self.states[key] = FutureState()
            return state, True

    def retain(self, key: Key) -> None:
        with self.lock:
            self._handles[key] += 1

    def released(self, key: Key) -> None:
        """A handle of ``key`` is gone (lock-free: may run inside garbage collection); see :meth:`purge`."""
        self._released.put(key)

    def purge(self) -> None:
        """Forget settled keys whose last handle is gone (called by the courier thread)."""
        with self.lock:
            while True:
                try:
                    key = self._released.get_nowait()
                except queue.Empty:
                    return
                self._handles[key] -= 1
                if self._handles[key] <= 0:
                    del self._handles[key]
                    self._forget_if_done(key)

    def _forget_if_done(self, key: Key) -> None:
        state = self.states.get(key)
        if state is not None and state.status != "pending" and key not in self._handles:
            if self._needed[key] > 0:
                return  # a call on its way still needs its value (to be sent, or sent again)
            del self.states[key]
            self.values.pop(key, None)
            self.finished_calls.pop(key, None)

    def tally(self, worker: str, site: str, outcomes: int) -> None:
        with self.lock:
            self.by_worker[worker] += outcomes
            self.by_site[site] += outcomes

    def new_group(self) -> int:
        return next(self._groups)

    # -- calls ---------------------------------------------------------------------------------------------------

    def add(self, call: CallRecord) -> None:
        """Register a new call: it waits for the futures in its arguments, or goes to the outbox."""
        with self.lock:
            self.calls[call.key] = call
            self._needed.update(call.deps)
            for dep in call.deps:
                state = self.states.get(dep)
                if state is None:
                    raise ValueError(f"{call.label} depends on future {dep!r}, which this client does not know")
                if dep not in self.values or state.status != "finished":
                    call.waiting.add(dep)
                    self._dependents.setdefault(dep, set()).add(call.key)
            if not call.waiting:
                self._outbox.append(call)
        for dep in list(call.waiting):
            self.states[dep].on_done(functools.partial(self._dependency_done, dep))

    def _dependency_done(self, dep: Key) -> None:
        with self.lock:
            state = self.states.get(dep)
            for key in self._dependents.pop(dep, set()):
                call = self.calls.get(key)
                if call is None or dep not in call.waiting:
                    continue
                if state is None or state.status != "finished" or dep not in self.values:
                    self._drop_call(key)
                    target = self.states.get(key)
                    if target is None:
                        continue
                    if state is not None and state.status == "cancelled":
                        target.cancel(f"its dependency {dep!r} was cancelled")
                    else:
                        exc = (
                            state.exception
                            if state is not None and state.exception
                            else RuntimeError(f"dependency {dep!r} was {state.status if state else 'forgotten'}")
                        )
                        target.fail(exc)
                    continue
                call.waiting.discard(dep)
                if not call.waiting:
                    self._outbox.append(call)
            self._forget_if_done(dep)

    def deps_of(self, call: CallRecord) -> tuple[tuple[Key, Ref], ...]:
        """The values of a ready call's futures, as they travel."""
        with self.lock:
            return tuple((d, self.values[d]) for d in sorted(call.deps, key=repr))

    def take_outbox(self) -> list[CallRecord]:
        """The calls ready to be sent (in order), skipping cancelled ones."""
        with self.lock:
            out = [c for c in self._outbox if c.key in self.calls and c.message is None]
            self._outbox.clear()
            return out

    def has_outbox(self) -> bool:
        return bool(self._outbox)

    def sent(self, message: MessageRecord, calls: Iterable[CallRecord]) -> None:
        with self.lock:
            self.messages[message.id] = message
            for c in calls:
                c.message = message.id
            self.counts["messages"] += 1

    # -- what the workers say -------------------------------------------------------------------------------------

    def leased(self, ids: Iterable[str], worker: str, now: float) -> None:
        with self.lock:
            for mid in ids:
                m = self.messages.get(mid)
                if m is not None:
                    m.lease_until = now + self.lease_timeout
                    m.worker = worker

    def extend_leases(self, now: float) -> None:
        """Every lease runs from ``now`` again: the client could not hear the workers for a while (their notes
        waited in its results queue), which says nothing about them."""
        with self.lock:
            for m in self.messages.values():
                if m.lease_until is not None:
                    m.lease_until = max(m.lease_until, now + self.lease_timeout)

    def lapsed(self, now: float) -> list[str]:
        """Messages whose lease ran out: their worker is gone."""
        with self.lock:
            return [m.id for m in self.messages.values() if m.lease_until is not None and m.lease_until < now]

    def resend(self, mid: str, *, died: bool, why: str) -> None:
        """Put the calls of message ``mid`` back into the outbox (each alone if its worker died running it); a
        call whose worker died ``delivery_limit`` times fails with :class:`TaskDeadLettered`."""
        with self.lock:
            m = self.messages.pop(mid, None)
            if m is None:
                return
            doomed = []
            for key in m.keys:
                call = self.calls.get(key)
                if call is None or call.message != mid:
                    continue
                call.message = None
                if died:
                    call.attempts += 1
                    call.batch = 1
                if call.attempts >= self.delivery_limit:
                    doomed.append(call)
                    self._drop_call(key)
                else:
                    self._outbox.append(call)
                    self.counts["resent"] += 1
        for call in doomed:
            self.counts["dead"] += 1
            state = self.states.get(call.key)
            if state is not None:
                state.fail(
                    TaskDeadLettered(
                        f"task {call.label} [{call.key}] was started {call.attempts} times and its worker died "
                        f"every time ({why}; a crash, out of memory, or os._exit in the task?)"
                    )
                )

    def outcome(self, mid: str, key: Key, settle: Callable[[FutureState], bool], value: Ref | None) -> bool:
        """Settle ``key`` with the first outcome that arrives (``settle(state)``); False for a duplicate.

        ``value`` is how the value reaches dependents (the inline pickle, a lake object); None for errors."""
        with self.lock:
            call = self.calls.get(key)
            if call is not None and call.message == mid:
                call.inputs = {d: self.states[d] for d in call.deps if d in self.states}  # they may go with the call
                self._drop_call(key)
                self.finished_calls[key] = call
            m = self.messages.get(mid)
            if m is not None and all(k not in self.calls or self.calls[k].message != mid for k in m.keys):
                del self.messages[mid]
            state = self.states.get(key)
            if state is None or state.status != "pending":
                self.counts["duplicates"] += 1
                return False
            if value is not None:
                self.values[key] = value
        settled = settle(state)
        with self.lock:
            self._forget_if_done(key)
        return settled

    def _drop_call(self, key: Key) -> None:
        call = self.calls.pop(key, None)
        if call is None:
            return
        for dep in call.waiting:
            self._dependents.get(dep, set()).discard(key)
        for dep in call.deps:
            self._needed[dep] -= 1
            if self._needed[dep] <= 0:
                del self._needed[dep]
                self._forget_if_done(dep)

    # -- the client's own decisions ---------------------------------------------------------------------------------

    def cancel(self, keys: Iterable[Key]) -> tuple[bool, list[str]]:
        """Cancel keys (pending ones, and release finished ones); returns (whether any was pending, ids of
        messages none of whose calls is wanted any more — the workers are told to drop those)."""
        any_pending = False
        revoke: list[str] = []
        settle: list[FutureState] = []
        with self.lock:
            for key in keys:
                state = self.states.get(key)
                if state is None:
                    continue
                any_pending |= state.status == "pending"
                call = self.calls.get(key)
                mid = call.message if call is not None else None
                self._drop_call(key)
                self.values.pop(key, None)
                settle.append(state)
                m = self.messages.get(mid) if mid else None
                if m is not None and not any(k in self.calls and self.calls[k].message == m.id for k in m.keys):
                    del self.messages[m.id]
                    revoke.append(m.id)
        for state in settle:
            if not state.cancel():  # a finished future is released: cancelled from now on, as in distributed
                with state._cond:
                    state.status, state.exception = "cancelled", _cancelled()
        return any_pending, revoke

    def retry(self, keys: Iterable[Key]) -> int:
        """Send failed calls again (their states back to pending); returns how many."""
        again = []
        with self.lock:
            for key in keys:
                call = self.finished_calls.get(key)
                state = self.states.get(key)
                if call is None or state is None or not state.reset():
                    continue
                del self.finished_calls[key]
                call.message, call.attempts = None, 0
                self.calls[key] = call
                self._needed.update(call.deps)
                again.append(call)
            self._outbox.extend(again)
        return len(again)

    def fail_all(self, which: Callable[[CallRecord], bool], exc: BaseException, *, forget: bool = False) -> int:
        """Fail the calls ``which`` selects with ``exc``; ``forget``: also forget their keys, so that the same
        call submitted again runs (the broker could not be reached)."""
        with self.lock:
            doomed = [c for c in self.calls.values() if which(c)]
            for c in doomed:
                self._drop_call(c.key)
                if c.message is not None:
                    self.messages.pop(c.message, None)
            states = [(c.key, self.states.get(c.key)) for c in doomed]
            if forget:
                for key, _ in states:
                    self.states.pop(key, None)
        for _, state in states:
            if state is not None:
                state.fail(exc)
        return len(doomed)

    def in_flight(self) -> list[MessageRecord]:
        with self.lock:
            return list(self.messages.values())

    def pending_resources(self) -> set[str | None]:
        with self.lock:
            return {c.resource for c in self.calls.values() if c.message is not None}

    def busy(self) -> bool:
        with self.lock:
            return bool(self.calls)

    def pending_states(self) -> list[FutureState]:
        with self.lock:
            return [s for s in self.states.values() if s.status == "pending"]


def _cancelled() -> BaseException:
    from concurrent.futures import CancelledError

    return CancelledError()


def now() -> float:
    return time.monotonic()
