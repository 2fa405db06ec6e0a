"""Futures over plain FutureStates (no client): first outcome wins, guarded callbacks, wait and as_completed."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import CancelledError
from typing import Any

import pytest

from mqexec.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    FutureState,
    Lazy,
    as_completed,
    futures_of,
    wait,
)

NO_HANG = 30  #: seconds: an upper bound that only proves "no hang"


def _future(key: Any = "k") -> Future:
    return Future(key, FutureState(), None)


def _settle(f: Future, value: Any = None) -> None:
    assert f._state.finish(value)


def _boom() -> None:
    raise RuntimeError("callback bug")


def test_the_first_outcome_wins_and_later_ones_are_ignored() -> None:
    state = FutureState()
    assert state.finish(1, "builtins.int")
    assert not state.finish(2)
    assert not state.fail(KeyError("late"))
    assert not state.cancel()
    assert (state.status, state.value(), state.exception, state.type_name) == ("finished", 1, None, "builtins.int")


def test_an_error_first_stays_an_error() -> None:
    state = FutureState()
    assert state.fail(KeyError("x"))
    assert not state.finish(1)
    f = Future("k", state, None)
    assert f.status == "error" and isinstance(f.exception(), KeyError)
    with pytest.raises(KeyError):
        f.result()


def test_callbacks_fire_once_in_order_and_late_ones_at_once() -> None:
    state = FutureState()
    calls: list[str] = []
    state.on_done(lambda: calls.append("a"))
    state.on_done(lambda: calls.append("b"))
    state.finish(1)
    state.finish(2)
    state.fail(ValueError())
    assert calls == ["a", "b"]
    state.on_done(lambda: calls.append("late"))
    assert calls == ["a", "b", "late"]


def test_a_raising_callback_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    state = FutureState()
    calls: list[str] = []
    state.on_done(_boom)
    state.on_done(lambda: calls.append("second"))
    with caplog.at_level(logging.ERROR, logger="mqexec.client"):
        assert state.finish(1)
    assert calls == ["second"] and state.status == "finished"
    assert "a done-callback raised (the other callbacks still run)" in caplog.text and "callback bug" in caplog.text
    with caplog.at_level(logging.ERROR, logger="mqexec.client"):
        state.on_done(_boom)  # already settled: runs at once, guarded the same way
    assert caplog.text.count("a done-callback raised") == 2


def test_a_batch_whose_first_callback_raises_leaves_none_pending() -> None:
    """Regression (issue 8): settling a batch in one loop once left ['finished', 'pending', 'pending', 'pending']."""
    states = [FutureState() for _ in range(4)]
    states[0].on_done(_boom)
    for i, state in enumerate(states):
        state.finish(i)
    assert [s.status for s in states] == ["finished"] * 4


def test_user_callbacks_run_on_their_own_thread_and_a_raising_one_does_not_stop_the_rest() -> None:
    f = _future()
    seen: list[tuple[Future, str]] = []
    done = threading.Event()

    def record(fut: Future) -> None:
        seen.append((fut, threading.current_thread().name))
        done.set()

    f.add_done_callback(lambda fut: _boom())
    f.add_done_callback(record)
    _settle(f, 42)
    assert done.wait(NO_HANG)
    assert seen[0][0] is f and seen[0][1].startswith("mqexec-callback")


def test_a_lazy_value_is_loaded_once_on_first_use() -> None:
    loads: list[int] = []
    state = FutureState()

    def load() -> str:
        loads.append(1)
        return "value"

    state.finish(Lazy(load))
    assert loads == []
    f = Future("k", state, None)
    assert f.result() == "value" and f.result() == "value"
    assert loads == [1]


def test_result_timeout_in_words() -> None:
    with pytest.raises(TimeoutError, match=r"^k not done after 0\.05 s$"):
        _future().result(timeout="50 ms")
    with pytest.raises(TimeoutError, match="not done after 0 s"):
        _future().exception(timeout=0)


def test_a_remote_error_is_raised_with_its_traceback() -> None:
    try:
        raise ValueError("remote")
    except ValueError as exc:
        err = exc
    f = _future()
    f._state.fail(err)
    assert f.traceback() is err.__traceback__
    with pytest.raises(ValueError, match="remote") as info:
        f.result()
    assert info.value is err


def test_cancel_without_a_client() -> None:
    f = _future()
    assert f.cancel() and f.cancelled() and f.done()
    with pytest.raises(CancelledError):
        f.result()
    assert f.exception() is None and f.traceback() is None
    assert not f.cancel()  # settled already


def test_handles_of_a_key_are_equal_and_share_the_state() -> None:
    state = FutureState()
    a, b = Future(("x", 1), state, None), Future(("x", 1), state, None)
    assert a == b and hash(a) == hash(b) and a != _future("other")
    state.finish(7, "builtins.int")
    assert b.result() == 7 and b.type is int
    assert repr(a) == "<Future: finished, type: int, key: ('x', 1)>"


def test_futures_of_finds_them_in_containers() -> None:
    a, b, c = _future("a"), _future("b"), _future("c")
    found = futures_of([a, {"x": (b, {c}), "y": [a]}, "not a future", 3])
    assert sorted(f.key for f in found) == ["a", "b", "c"]


# -- wait ---------------------------------------------------------------------------------------------------------


def test_wait_all_completed() -> None:
    fs = [_future(i) for i in range(3)]
    for f in fs:
        _settle(f)
    done, not_done = wait(fs)
    assert done == set(fs) and not_done == set()


def test_wait_first_completed_returns_when_one_is_done() -> None:
    a, b = _future("a"), _future("b")
    timer = threading.Timer(0.05, _settle, (b,))
    timer.start()
    done, not_done = wait([a, b], timeout=NO_HANG, return_when=FIRST_COMPLETED)
    timer.join()
    assert done == {b} and not_done == {a}


def test_wait_first_exception() -> None:
    a, b, c = _future("a"), _future("b"), _future("c")
    _settle(a)
    b._state.fail(KeyError("x"))
    done, not_done = wait([a, b, c], timeout=NO_HANG, return_when=FIRST_EXCEPTION)
    assert done == {a, b} and not_done == {c}


def test_wait_first_exception_without_an_exception_waits_for_all() -> None:
    a, b = _future("a"), _future("b")
    _settle(a)
    with pytest.raises(TimeoutError, match=r"1 of 2 futures not done after 0\.05 s"):
        wait([a, b], timeout="50ms", return_when=FIRST_EXCEPTION)


def test_wait_times_out_naming_how_many() -> None:
    fs = [_future(i) for i in range(3)]
    _settle(fs[0])
    with pytest.raises(TimeoutError, match=r"2 of 3 futures not done after 0\.05 s"):
        wait(fs, timeout=0.05, return_when=ALL_COMPLETED)


def test_wait_on_one_future_and_on_nothing() -> None:
    f = _future()
    _settle(f)
    assert wait(f).done == {f}
    assert wait([], return_when=FIRST_COMPLETED) == (set(), set())


def test_wait_refuses_an_unknown_condition() -> None:
    with pytest.raises(ValueError, match="return_when must be FIRST_COMPLETED, FIRST_EXCEPTION or ALL_COMPLETED"):
        wait([_future()], return_when="SOMETIMES")


# -- as_completed -------------------------------------------------------------------------------------------------


def test_as_completed_yields_in_the_order_they_finish() -> None:
    a, b, c = _future("a"), _future("b"), _future("c")
    it = as_completed([a, b, c])
    assert it.count() == 3
    for f in (c, a, b):
        _settle(f)
    assert it.has_ready()
    assert [f.key for f in it] == ["c", "a", "b"]
    assert it.is_empty()


def test_as_completed_with_results_errors_and_cancels() -> None:
    ok, bad, gone = _future("ok"), _future("bad"), _future("gone")
    _settle(ok, 1)
    bad._state.fail(KeyError("x"))
    gone._state.cancel()
    got = list(as_completed([ok, bad, gone], with_results=True, raise_errors=False))
    assert got[0] == (ok, 1)
    assert got[1][0] is bad and got[1][1][0] is KeyError and isinstance(got[1][1][1], KeyError)
    assert got[2][0] is gone and isinstance(got[2][1], CancelledError)
    bad2 = _future("bad2")
    bad2._state.fail(KeyError("raised"))
    with pytest.raises(KeyError, match="raised"):
        list(as_completed([bad2], with_results=True))


def test_as_completed_takes_more_while_iterating_and_yields_duplicates_twice() -> None:
    a, b = _future("a"), _future("b")
    it = as_completed([a, a])
    _settle(a)
    seen = [next(it).key]
    it.add(b)
    _settle(b)
    seen += [f.key for f in it]
    assert seen == ["a", "a", "b"]


def test_as_completed_batches() -> None:
    fs = [_future(i) for i in range(4)]
    it = as_completed(fs)
    for f in fs[:3]:
        _settle(f)
    batches = it.batches()
    assert [f.key for f in next(batches)] == [0, 1, 2]
    _settle(fs[3])
    assert [f.key for f in next(batches)] == [3]
    assert list(batches) == []


def test_as_completed_times_out_and_refuses_what_is_not_a_future() -> None:
    it = as_completed([_future()], timeout="50 ms")
    with pytest.raises(TimeoutError, match="1 futures not done in time"):
        next(it)
    with pytest.raises(TypeError, match="Input must be a future, got 3"):
        as_completed([3])  # type: ignore[list-item]


def test_as_completed_clear_stops_watching() -> None:
    a = _future("a")
    it = as_completed([a])
    it.clear()
    assert it.is_empty() and list(it) == []
