"""The restricted unpickler: plain data, arrays and histograms pass; anything that could run code is refused."""

from __future__ import annotations

import collections
import os
import pickle
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from mqexec import safepickle
from mqexec.errors import SerializationError, UnsafeResultError


@pytest.fixture(autouse=True)
def _no_allowances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safepickle, "_extra", set())


class Calibration:
    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Calibration) and other.scale == self.scale


class Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned",))


PLAIN: list[Any] = [
    {"n": 1, "x": 2.5, "c": 1j, "s": "text", "b": b"\x00", "ba": bytearray(b"ab"), "none": None, "t": True},
    [(1, 2), {3, 4}, frozenset({5}), range(3), slice(1, 5, 2)],  # range: __builtin__.xrange in protocols 0-2
    collections.OrderedDict(a=1),
    collections.Counter("hello"),
    collections.deque([1, 2]),
]


@pytest.mark.parametrize("value", PLAIN, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_plain_data_passes_in_every_protocol(value: Any, protocol: int) -> None:
    assert safepickle.loads(pickle.dumps(value, protocol=protocol)) == value


def test_a_defaultdict_of_a_builtin_passes() -> None:
    value = collections.defaultdict(list, {"a": [1]})
    back = safepickle.loads(pickle.dumps(value))
    assert back == value and back.default_factory is list


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_numpy_arrays_and_scalars_pass(protocol: int) -> None:
    value: dict[str, Any] = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "s": np.int64(3),
        "r": np.zeros(2, dtype=[("pt", "f8"), ("eta", "f4")]),
        "m": np.ma.masked_array([1, 2], mask=[False, True]),
    }
    back = safepickle.loads(pickle.dumps(value, protocol=protocol))
    np.testing.assert_array_equal(back["a"], value["a"])
    assert back["a"].dtype == np.float32 and back["s"] == 3 and back["r"].dtype == value["r"].dtype
    assert back["m"].mask.tolist() == [False, True]


def test_a_histogram_passes() -> None:
    hist = pytest.importorskip("hist")
    h = hist.Hist.new.Reg(10, 0, 1, name="x").Double()
    h.fill(x=[0.05, 0.5, 0.55])
    back = safepickle.loads(pickle.dumps(h))
    assert back == h and back.sum() == 3


@pytest.mark.parametrize(
    "value, named",
    [
        (print, "builtins.print"),
        (Evil(), "posix.system"),
        (Calibration(1.5), "unit.test_safepickle.Calibration"),
        (Fraction(1, 3), "fractions.Fraction"),
        ([1, {"nested": Calibration(2.0)}], "unit.test_safepickle.Calibration"),
        (np.load, "numpy.load"),
    ],
    ids=lambda v: type(v).__name__,
)
def test_anything_else_is_refused_naming_it_and_how_to_allow_it(value: Any, named: str) -> None:
    data = pickle.dumps(value)
    with pytest.raises(UnsafeResultError) as info:
        safepickle.loads(data)
    text = str(info.value)
    assert f"holds {named}, which mqexec does not unpickle" in text
    assert f'mqexec.allow("{named}")' in text and "\n" not in text
    assert isinstance(info.value, SerializationError)


def test_a_python2_module_name_is_mapped_and_still_checked() -> None:
    data = b"c__builtin__\neval\n(S'1'\ntR."  # protocol 0: __builtin__.eval("1")
    with pytest.raises(UnsafeResultError, match=r"builtins\.eval"):
        safepickle.loads(data)
    assert safepickle.loads(b"c__builtin__\nset\n((lp0\nI1\natR.") == {1}


def test_allow_by_class_or_by_name() -> None:
    data = pickle.dumps(Calibration(1.5))
    safepickle.allow(Calibration)
    assert safepickle.loads(data) == Calibration(1.5)
    safepickle.allow("fractions.Fraction")
    assert safepickle.loads(pickle.dumps(Fraction(1, 3))) == Fraction(1, 3)
    with pytest.raises(UnsafeResultError, match=r"builtins\.print"):
        safepickle.loads(pickle.dumps(print))  # allowing some names allows nothing else


def test_allow_wants_a_module_and_a_name() -> None:
    with pytest.raises(ValueError, match=r"allow\(\) wants 'module\.Name', got 'Calibration'"):
        safepickle.allow("Calibration")
