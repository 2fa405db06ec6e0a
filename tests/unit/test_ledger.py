"""The client's ledger without a broker: outbox, leases, resends, dead letters, dependency values, cancels."""

from __future__ import annotations

from concurrent.futures import CancelledError
from typing import Any

import pytest

from mqexec.errors import TaskDeadLettered
from mqexec.futures import FutureState
from mqexec.ledger import CallRecord, Function, Ledger, MessageRecord
from mqexec.wire import Key, Ref

FN = Function(hash="f" * 64, ref=Ref.inline(b"fn"), name="inc")
LEASE = 60.0


@pytest.fixture
def ledger() -> Ledger:
    return Ledger(delivery_limit=3, lease_timeout=LEASE)


def _submit(ledger: Ledger, key: Key, deps: tuple[Key, ...] = ()) -> CallRecord:
    """What Client.submit does: a state with one handle, and the call."""
    assert ledger.state(key)[1]  # a new key
    ledger.retain(key)
    call = CallRecord(key=key, label=f"inc({key!r})", fn=FN, args=Ref.inline(b"args"), deps=frozenset(deps))
    ledger.add(call)
    return call


def _send(ledger: Ledger, mid: str, *calls: CallRecord) -> MessageRecord:
    """What the courier does with the outbox: one message for these calls."""
    message = MessageRecord(mid, [c.key for c in calls], None, sent_at=0.0)
    ledger.sent(message, calls)
    return message


def _finish(ledger: Ledger, mid: str, key: Key, value: Any = "v") -> bool:
    return ledger.outcome(mid, key, lambda s: s.finish(value), Ref.inline(b"value of " + str(key).encode()))


def _drop_handle(ledger: Ledger, key: Key) -> None:
    ledger.released(key)
    ledger.purge()


def _callback_bug() -> None:
    raise RuntimeError("a bug in a done-callback")


def test_a_call_without_dependencies_goes_to_the_outbox_once(ledger: Ledger) -> None:
    a, b = _submit(ledger, "a"), _submit(ledger, "b")
    assert ledger.has_outbox()
    assert ledger.take_outbox() == [a, b]
    assert ledger.take_outbox() == [] and not ledger.has_outbox()


def test_a_cancelled_call_is_not_sent(ledger: Ledger) -> None:
    _submit(ledger, "a")
    b = _submit(ledger, "b")
    any_pending, revoke = ledger.cancel(["a"])
    assert any_pending and revoke == []
    assert ledger.take_outbox() == [b]
    assert ledger.states["a"].status == "cancelled"


def test_a_lease_runs_out_only_after_lease_timeout(ledger: Ledger) -> None:
    a = _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    assert ledger.lapsed(now=1e9) == []  # still in the queue: no lease yet, nothing lapses
    ledger.leased(["m1", "unknown"], "w1", now=100.0)
    assert ledger.in_flight()[0].worker == "w1"
    assert ledger.lapsed(now=100.0 + LEASE - 1) == []
    ledger.leased(["m1"], "w1", now=150.0)  # renewed
    assert ledger.lapsed(now=100.0 + LEASE + 1) == []
    assert ledger.lapsed(now=150.0 + LEASE + 1) == ["m1"]
    ledger.resend("m1", died=False, why="lease ran out")
    assert ledger.take_outbox() == [a] and a.attempts == 0 and a.message is None
    assert ledger.counts["resent"] == 1 and ledger.in_flight() == []


def test_a_call_whose_worker_died_is_resent_alone_until_the_delivery_limit(ledger: Ledger) -> None:
    a, b = _submit(ledger, "a"), _submit(ledger, "b")
    a.batch = b.batch = 8
    for attempt in range(1, 3):
        _send(ledger, f"m{attempt}", *ledger.take_outbox())
        ledger.resend(f"m{attempt}", died=True, why="pool process died")
        assert (a.attempts, a.batch, b.batch) == (attempt, 1, 1)
        assert ledger.states["a"].status == "pending"
    _send(ledger, "m3", *ledger.take_outbox())
    ledger.resend("m3", died=True, why="on w1: SIGKILL")
    for key in ("a", "b"):
        exc = ledger.states[key].exception
        assert isinstance(exc, TaskDeadLettered) and ledger.states[key].status == "error"
        assert f"task inc({key!r}) [{key}] was started 3 times and its worker died every time (on w1: SIGKILL" in str(
            exc
        )
    assert ledger.counts["dead"] == 2 and not ledger.busy() and ledger.take_outbox() == []


def test_resending_an_unknown_or_settled_message_does_nothing(ledger: Ledger) -> None:
    a = _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    _finish(ledger, "m1", "a")
    ledger.resend("m1", died=True, why="late news")
    ledger.resend("nope", died=True, why="never sent")
    assert ledger.take_outbox() == [] and a.attempts == 0 and ledger.counts["resent"] == 0


def test_the_first_outcome_settles_and_duplicates_are_counted(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    ledger.resend("m1", died=False, why="lease ran out")
    _send(ledger, "m2", *ledger.take_outbox())
    assert _finish(ledger, "m1", "a", "first")  # the first copy's worker was only slow
    assert not _finish(ledger, "m2", "a", "second")
    assert not ledger.outcome("m2", "a", lambda s: s.fail(KeyError("x")), None)
    assert ledger.states["a"].value() == "first" and ledger.counts["duplicates"] == 2
    assert not ledger.busy() and ledger.in_flight() == []


def test_a_batch_whose_first_callback_raises_leaves_none_pending(ledger: Ledger) -> None:
    """Regression (issue 8): one raising done-callback once left the rest of its message's futures pending."""
    calls = [_submit(ledger, k) for k in "abcd"]
    _send(ledger, "m1", *ledger.take_outbox())
    ledger.states["a"].on_done(_callback_bug)
    for c in calls:  # as the courier settles a result frame: outcome by outcome
        _finish(ledger, "m1", c.key)
    assert [ledger.states[k].status for k in "abcd"] == ["finished"] * 4
    assert ledger.in_flight() == []


def test_a_dependent_waits_for_its_dependency_and_gets_its_value(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    b = _submit(ledger, "b", deps=("a",))
    assert ledger.take_outbox() == [] and b.waiting == {"a"}
    _finish(ledger, "m1", "a")
    assert ledger.take_outbox() == [b] and b.waiting == set()
    assert ledger.deps_of(b) == (("a", Ref.inline(b"value of a")),)


def test_a_dependency_already_finished_sends_the_dependent_at_once(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    _finish(ledger, "m1", "a")
    b = _submit(ledger, "b", deps=("a",))
    assert ledger.take_outbox() == [b]


def test_a_value_is_kept_while_a_call_needs_it_and_forgotten_after(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    _finish(ledger, "m1", "a")
    b = _submit(ledger, "b", deps=("a",))
    _drop_handle(ledger, "a")  # the user let go of a's future ...
    assert "a" in ledger.states and "a" in ledger.values  # ... but b is on its way and may be sent again
    _send(ledger, "m2", *ledger.take_outbox())
    ledger.resend("m2", died=False, why="lease ran out")
    assert ledger.deps_of(b) == (("a", Ref.inline(b"value of a")),)
    _send(ledger, "m3", *ledger.take_outbox())
    _finish(ledger, "m3", "b")
    assert "a" not in ledger.states and "a" not in ledger.values
    assert "b" in ledger.states  # b's own handle is still held
    _drop_handle(ledger, "b")
    assert ledger.states == {} and ledger.values == {} and ledger.finished_calls == {}


def test_a_pending_key_is_kept_when_its_handle_goes(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _drop_handle(ledger, "a")
    assert ledger.states["a"].status == "pending"


def test_cancelling_a_dependency_cancels_its_dependents(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    _submit(ledger, "b", deps=("a",))
    _submit(ledger, "c", deps=("b",))
    any_pending, revoke = ledger.cancel(["a"])
    assert any_pending and revoke == ["m1"]  # no call of m1 is wanted: the workers may drop it
    assert [ledger.states[k].status for k in "abc"] == ["cancelled"] * 3
    with pytest.raises(CancelledError, match="its dependency 'a' was cancelled"):
        raise ledger.states["b"].exception  # type: ignore[misc]
    assert ledger.take_outbox() == [] and not ledger.busy()


def test_a_failed_dependency_fails_its_dependents_with_its_exception(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    _submit(ledger, "b", deps=("a",))
    err = KeyError("missing column")
    ledger.outcome("m1", "a", lambda s: s.fail(err), None)
    assert ledger.states["b"].status == "error" and ledger.states["b"].exception is err
    assert ledger.take_outbox() == [] and not ledger.busy()


def test_cancelling_one_call_of_a_message_keeps_the_message(ledger: Ledger) -> None:
    _submit(ledger, "a"), _submit(ledger, "b")
    _send(ledger, "m1", *ledger.take_outbox())
    assert ledger.cancel(["a"]) == (True, [])
    assert ledger.cancel(["b"]) == (True, ["m1"])
    assert ledger.cancel(["unknown"]) == (False, [])


def test_cancelling_a_finished_key_releases_it(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _send(ledger, "m1", *ledger.take_outbox())
    _finish(ledger, "m1", "a")
    assert ledger.cancel(["a"]) == (False, [])
    assert ledger.states["a"].status == "cancelled" and "a" not in ledger.values
    state, new = ledger.state("a")  # submitted again: a fresh state
    assert new and state.status == "pending"


def test_an_unknown_dependency_is_refused(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="inc\\('b'\\) depends on future 'ghost', which this client does not know"):
        _submit(ledger, "b", deps=("ghost",))


def test_fail_all_with_forget_lets_the_same_call_run_again(ledger: Ledger) -> None:
    _submit(ledger, "a")
    _submit(ledger, "b")
    _send(ledger, "m1", *ledger.take_outbox())
    state = ledger.states["a"]
    assert ledger.fail_all(lambda c: c.key == "a", ConnectionError("broker gone"), forget=True) == 1
    assert state.status == "error" and "a" not in ledger.states
    assert ledger.state("a")[1]  # new
    assert ledger.states["b"].status == "pending" and ledger.busy()


def test_pending_states_and_resources(ledger: Ledger) -> None:
    a = _submit(ledger, "a")
    a.resource = "GPU"
    _submit(ledger, "b")
    assert ledger.pending_resources() == set()  # nothing sent yet
    _send(ledger, "m1", *ledger.take_outbox())
    assert ledger.pending_resources() == {"GPU", None}
    assert len(ledger.pending_states()) == 2
    assert all(isinstance(s, FutureState) for s in ledger.pending_states())
