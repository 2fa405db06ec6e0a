"""The wire format without a broker: signed tasks, HMAC-signed frames, outcomes, keys, refs, future placeholders."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from mqexec.errors import SignatureError
from mqexec.futures import Future, FutureState
from mqexec.keys import Identity
from mqexec.wire import (
    Call,
    ForeignKey,
    Frame,
    Outcome,
    Ref,
    Task,
    collecting,
    key_from_json,
    key_to_json,
    outcomes_of,
    resolving,
    result_frame,
)


@pytest.fixture(scope="module")
def me() -> Identity:
    return Identity.new()


def _task(me: Identity, **changes: Any) -> Task:
    calls = (
        Call(key="inc-1", label="inc(1)", args=Ref.inline(b"args-1")),
        Call(
            key=("fill", 3, ("x", 0.5)),
            label="fill(3)",
            args=Ref(blob="ab" * 32, size=70_000, pieces=2),
            deps=((("read", 3), Ref.inline(b"dep")), ("big", Ref(lake={"url": "file:///l/x", "size": 9}, size=9))),
            retries=2,
        ),
    )
    task = Task(
        id="m1",
        prefix="mqexec",
        session="s1",
        key_id=me.trust.key_id,
        nonce="n1",
        expires=2e9,
        python="3.11",
        reply_to="mqexec.results.s1",
        fn=Ref.inline(b"\x00fn\xff"),
        calls=calls,
        code=Ref(blob="cd" * 32, size=100),
        lake="file:///tmp/lake",
        attempt=3,
    )
    return task.copy(**changes)


def _travel(wire: dict[str, Any]) -> Any:
    """What the worker gets: the Celery argument went through JSON."""
    return json.loads(json.dumps(wire))


def test_a_signed_task_arrives_whole(me: Identity) -> None:
    task = _task(me)
    assert Task.verify(_travel(task.sign(me)), me.trust) == task


@pytest.mark.parametrize(
    "field, value",
    [
        ("prefix", "other"),
        ("exp", 4e9),
        ("try", 1),
        ("kid_extra", "x"),
        ("fn", {"i": "Zm9yZ2Vk"}),
    ],
)
def test_a_changed_field_breaks_the_signature(me: Identity, field: str, value: Any) -> None:
    wire = _travel(_task(me).sign(me))
    wire[field] = value
    with pytest.raises(SignatureError, match="'m1' has a bad signature: forged or tampered with") as info:
        Task.verify(wire, me.trust)
    assert not isinstance(info.value, ForeignKey)


def test_a_changed_call_breaks_the_signature(me: Identity) -> None:
    wire = _travel(_task(me).sign(me))
    wire["calls"][1]["r"] = 99  # more retries than the analyst asked for
    with pytest.raises(SignatureError, match="bad signature"):
        Task.verify(wire, me.trust)


@pytest.mark.parametrize("sig", ["not base64 !", "", "AAAA"])
def test_a_garbled_signature_is_a_bad_signature(me: Identity, sig: str) -> None:
    wire = _travel(_task(me).sign(me))
    wire["sig"] = sig
    with pytest.raises(SignatureError, match="bad signature"):
        Task.verify(wire, me.trust)


def test_a_task_of_another_identity_is_a_foreign_key_naming_both(me: Identity) -> None:
    other = Identity.new()
    wire = _travel(_task(other, key_id=other.trust.key_id).sign(other))
    with pytest.raises(ForeignKey) as info:
        Task.verify(wire, me.trust)
    assert other.trust.key_id in str(info.value) and me.trust.key_id in str(info.value)
    assert isinstance(info.value, SignatureError)


def test_a_task_signed_by_another_identity_under_my_key_id_is_forged(me: Identity) -> None:
    other = Identity.new()
    with pytest.raises(SignatureError, match="bad signature"):
        Task.verify(_travel(_task(me).sign(other)), me.trust)


@pytest.mark.parametrize("wire", [None, [], "task", {"id": "m1"}, {"sig": 5}])
def test_what_is_not_a_task_is_refused(me: Identity, wire: Any) -> None:
    with pytest.raises(SignatureError, match="not a signed mqexec task"):
        Task.verify(wire, me.trust)


def test_another_envelope_version_is_refused_after_the_signature(me: Identity) -> None:
    with pytest.raises(SignatureError, match="envelope version 1; this mqexec speaks 2"):
        Task.verify(_travel(_task(me, v=1).sign(me)), me.trust)


def test_a_signed_but_malformed_task_is_refused_in_one_sentence(me: Identity) -> None:
    with pytest.raises(SignatureError, match="'m1' is signed but malformed") as info:
        Task.verify(_travel(_task(me, expires="soon").sign(me)), me.trust)
    assert "\n" not in str(info.value)


# -- frames -------------------------------------------------------------------------------------------------------

KEY = b"k" * 32


def _frame() -> Frame:
    return Frame("result", "s1", "w1@host", {"msg": "m1", "extra": [1, "two"]}, (b"\x00\x01", b"", b"x" * 1000))


def test_a_frame_round_trips_with_binary_parts() -> None:
    raw = _frame().encode(KEY)
    assert Frame.session_of(raw) == "s1"
    assert Frame.decode(raw, KEY) == _frame()


@pytest.mark.parametrize("cut", [1, 500, 1002])
def test_a_truncated_frame_is_refused(cut: int) -> None:
    raw = _frame().encode(KEY)
    with pytest.raises(SignatureError, match="do not match its header: truncated or tampered with"):
        Frame.decode(raw[:-cut], KEY)


def test_a_frame_with_bytes_added_is_refused() -> None:
    with pytest.raises(SignatureError, match="truncated or tampered with"):
        Frame.decode(_frame().encode(KEY) + b"!", KEY)


def test_a_changed_part_or_header_breaks_the_signature() -> None:
    raw = bytearray(_frame().encode(KEY))
    raw[-1] ^= 1
    with pytest.raises(SignatureError, match="result frame from 'w1@host' has a bad signature"):
        Frame.decode(bytes(raw), KEY)
    forged = _frame().encode(KEY).replace(b'"w1@host"', b'"w2@host"')
    with pytest.raises(SignatureError, match="bad signature"):
        Frame.decode(forged, KEY)


def test_a_frame_signed_with_another_key_is_refused() -> None:
    me = Identity.new()
    raw = _frame().encode(me.trust.result_key("another-session"))
    with pytest.raises(SignatureError, match="not from a worker of this session"):
        Frame.decode(raw, me.trust.result_key("s1"))


@pytest.mark.parametrize(
    "raw", [b"", b"MQXF", b"XXXX\x00\x00\x00\x02{}", b"MQXF\x00\x00\x00\x05[1,2]", b"MQXF\xff\xff"]
)
def test_what_is_not_a_frame_is_refused(raw: bytes) -> None:
    with pytest.raises(SignatureError, match="not an mqexec frame"):
        Frame.decode(raw, KEY)
    if len(raw) >= 8:
        with pytest.raises(SignatureError, match="not an mqexec frame"):
            Frame.session_of(raw)


def test_outcomes_round_trip_through_a_signed_frame() -> None:
    outcomes = [
        Outcome("a", True, "builtins.int", value=b"pickled 42"),
        Outcome(("p", 1), True, "numpy.ndarray", lake={"url": "root://h//l/objects/ab/abc", "size": 5, "sha256": "a"}),
        Outcome(("p", 2, ("q", 0.5)), True, "builtins.bytes", pieces=3, size=20 << 20, sha="f" * 64),
        Outcome("b", False, error={"type": "builtins.KeyError", "args": ["x"], "str": "'x'"}),
        Outcome("c", False, error={"type": "mqexec.errors.EnvironmentMismatch"}, system="env"),
    ]
    raw = result_frame("s1", "w1", "m7", outcomes, site="LCG.X.uk").encode(KEY)
    frame = Frame.decode(raw, KEY)
    assert frame.head["msg"] == "m7" and frame.head["site"] == "LCG.X.uk"
    assert outcomes_of(frame) == outcomes


@pytest.mark.parametrize(
    "key, as_json",
    [
        ("plain-key", "plain-key"),
        (("x", 1), ["x", 1]),
        (("x", 1, ("y", 2.5, ("z",))), ["x", 1, ["y", 2.5, ["z"]]]),
        ((), []),
    ],
)
def test_tuple_keys_travel_as_lists_and_come_back_as_tuples(key: Any, as_json: Any) -> None:
    assert key_to_json(key) == as_json
    assert key_from_json(json.loads(json.dumps(key_to_json(key)))) == key


@pytest.mark.parametrize(
    "ref",
    [
        Ref.inline(b"\x00\xffbytes"),
        Ref.inline(b""),
        Ref(blob="ab" * 32, size=10, pieces=0),
        Ref(blob="cd" * 32, size=40 << 20, pieces=3),
        Ref(lake={"url": "davs://h/lake/objects/ab/abcd", "size": 123, "sha256": "ab"}, size=123),
    ],
)
def test_refs_round_trip_through_json(ref: Ref) -> None:
    assert Ref.from_json(json.loads(json.dumps(ref.to_json()))) == ref


def test_an_inline_ref_with_bad_base64_is_refused() -> None:
    with pytest.raises(ValueError):
        Ref.from_json({"i": "not base64!"})


# -- futures inside arguments -------------------------------------------------------------------------------------


def test_a_pickled_future_is_noticed_and_unpickles_to_its_value() -> None:
    done = FutureState()
    args = ([Future(("x", 1), done, None)], {"y": Future("y", FutureState(), None)})
    with collecting() as seen:
        data = pickle.dumps(args)
    assert seen == {("x", 1), "y"}
    values = {("x", 1): 10, "y": "why"}
    with resolving(values.__getitem__):
        assert pickle.loads(data) == ([10], {"y": "why"})


def test_a_future_unpickled_outside_a_task_says_so() -> None:
    data = pickle.dumps(Future("lonely", FutureState(), None))
    with pytest.raises(RuntimeError, match="the future 'lonely' was unpickled outside an mqexec task"):
        pickle.loads(data)
