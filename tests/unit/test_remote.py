"""Remote exceptions without a worker: describe → JSON → rebuild, chains, unknown types, and that no code runs."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import pytest

from mqexec.errors import RemoteError
from mqexec.remote import describe, rebuild


def _travel(exc: BaseException) -> dict[str, Any]:
    """What the client gets: the description went through JSON in a result frame."""
    return json.loads(json.dumps(describe(exc)))


def _raised(exc: BaseException) -> BaseException:
    def deep_in_the_analysis() -> None:
        raise exc

    try:
        deep_in_the_analysis()
    except BaseException as caught:
        return caught
    raise AssertionError("not raised")


class Watched(Exception):
    """An exception class whose ``__init__`` must not run with values a worker chose."""

    inits = 0

    def __init__(self, *args: Any) -> None:
        Watched.inits += 1
        super().__init__(*args)


def test_a_builtin_exception_comes_back_with_its_type_args_and_frames() -> None:
    back = rebuild(_travel(_raised(KeyError("x"))), worker="w1@node")
    assert type(back) is KeyError and back.args == ("x",)
    assert back.__notes__ == ["(raised on mqexec worker w1@node)"]
    names = [frame.name for frame in traceback.extract_tb(back.__traceback__)]
    assert names[-1] == "deep_in_the_analysis"
    lines = traceback.format_exception(back)
    assert any("raise exc" in line for line in lines)


def test_notes_cause_and_context_come_back() -> None:
    empty: dict[str, int] = {}
    try:
        try:
            empty["k"]
        except KeyError as inner:
            err = ValueError("bad value")
            err.add_note("chunk 3 of ttbar")
            raise err from inner
    except ValueError as exc:
        back = rebuild(_travel(exc))
    assert type(back) is ValueError and back.__notes__ == ["chunk 3 of ttbar"]
    assert type(back.__cause__) is KeyError and back.__cause__.args == ("k",)
    assert back.__suppress_context__


def test_an_implicit_context_comes_back_unsuppressed() -> None:
    try:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            raise RuntimeError("while handling")  # noqa: B904 - the implicit context is the point
    except RuntimeError as exc:
        back = rebuild(_travel(exc))
    assert type(back.__context__) is ZeroDivisionError and not back.__suppress_context__


def test_a_chain_longer_than_five_is_cut() -> None:
    exc: BaseException = ValueError(0)
    for i in range(1, 10):
        outer = ValueError(i)
        outer.__cause__ = exc
        exc = outer
    back = rebuild(_travel(exc))
    depth = 0
    while back.__cause__ is not None:
        back, depth = back.__cause__, depth + 1
    assert depth == 5


def test_an_unknown_type_becomes_a_remote_error_naming_it() -> None:
    d = _travel(_raised(ValueError("bad")))
    d["type"] = "analysis_only_on_the_worker.CalibrationError"
    back = rebuild(d)
    assert isinstance(back, RemoteError)
    assert back.remote_type == "analysis_only_on_the_worker.CalibrationError"
    assert str(back) == "analysis_only_on_the_worker.CalibrationError: bad"
    assert "analysis_only_on_the_worker" not in sys.modules  # nothing was imported to find it


@pytest.mark.parametrize(
    "name",
    [
        "os.system",  # importable, but not an exception class
        "builtins.print",
        "builtins.SystemExit",  # an exception that would stop the client
        "builtins.KeyboardInterrupt",
        "json.not_there",
    ],
)
def test_what_is_not_a_plain_exception_class_becomes_a_remote_error(name: str) -> None:
    back = rebuild({"type": name, "args": ["rm -rf ~"], "str": "rm -rf ~"})
    assert isinstance(back, RemoteError) and back.remote_type == name


def test_a_custom_init_is_not_run_on_the_client() -> None:
    d = _travel(_raised(Watched("payload")))
    before = Watched.inits
    back = rebuild(d)
    assert type(back) is Watched and back.args == ("payload",)
    assert Watched.inits == before


def test_arguments_that_are_not_json_primitives_are_dropped() -> None:
    d = _travel(_raised(ValueError(object(), b"bytes")))
    assert d["args"] is None
    back = rebuild(d)
    assert type(back) is ValueError and back.args == (d["str"],)


def test_a_broken_str_does_not_lose_the_error() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    d = describe(_raised(Broken()))
    assert d["str"] == "<Broken: str() failed>"
