"""Issue 10, point 2: what a worker's bytes can do on the analyst's machine — nothing.

A compromised worker holds the run's token, so it can sign result frames the client accepts. Errors cross the wire
as JSON descriptions, never pickles; values are unpickled through the allow-list (``safe=True``, always for
MQExecutor outputs). Each test hands the client what such a worker could send — a marker file shows whether
anything ran — and asserts the future's outcome (and that it does not stay pending).
"""

from __future__ import annotations

import base64
import http.server
import pickle
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from test_security import evil_pickle, outcome_frame, send_frame, sent_message, sleep_then
from workerproc import Worker

import mqexec
from mqexec import safepickle
from mqexec.errors import BrokerError, RemoteError, UnsafeResultError
from mqexec.remote import rebuild
from mqexec.wire import Outcome

# -- hand-made pickles ------------------------------------------------------------------------------------------


def _s(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _global(module: str, name: str) -> bytes:
    return _s(module) + _s(name) + b"\x93"  # STACK_GLOBAL


_CALL1 = b"\x85R"  # TUPLE1, REDUCE: call what is below with the one argument on top


def through_an_allowed_package(code: str) -> bytes:
    """``exec(code)`` reached only through names pickle resolves inside ``coffea.processor.accumulator`` (an
    allowed package): its ``operator`` module's attrgetter/itemgetter walk from a class to ``__builtins__``."""
    acc = "coffea.processor.accumulator"
    return (
        b"\x80\x04"
        + (_global(acc, "operator.itemgetter") + _s("exec") + _CALL1)
        + (_global(acc, "operator.itemgetter") + _s("__builtins__") + _CALL1)
        + (_global(acc, "operator.attrgetter") + _s("__init__.__globals__") + _CALL1)
        + (_global(acc, "value_accumulator") + _CALL1 + _CALL1 + _CALL1)
        + (_s(code) + _CALL1 + b".")
    )


def one_global(module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)``."""
    return b"\x80\x04" + _global(module, name) + _s(arg) + _CALL1 + b"."


def _write(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')"


def attacks(marker: Path) -> dict[str, tuple[bytes, str]]:
    """name → (pickle, the ``module.name`` the refusal must name)."""
    return {
        "exec": (evil_pickle(marker), "builtins.exec"),
        "os.system": (one_global("os", "system", f"touch {marker}"), "os.system"),
        "subprocess.Popen": (one_global("subprocess", "Popen", f"touch {marker}"), "subprocess.Popen"),
        "numpy.memmap": (one_global("numpy", "memmap", str(marker)), "numpy.memmap"),
        "via coffea.processor.accumulator": (
            through_an_allowed_package(_write(marker)),
            "coffea.processor.accumulator.operator.itemgetter",
        ),
        "re-exported module": (one_global("hist", "numpy.memmap", str(marker)), "hist.numpy.memmap"),
        "a class's metaclass": (one_global("hist", "Hist.__class__", "x"), "hist.Hist.__class__"),
        "re-exported class": (one_global("coffea.processor.accumulator", "TypeVar", "T"), "TypeVar"),
    }


@pytest.mark.parametrize("name", list(attacks(Path("/nonexistent"))))
def test_the_restricted_unpickler_refuses_code(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    data, refused = attacks(marker)[name]
    with pytest.raises(UnsafeResultError, match=r"mqexec\.allow") as info:
        safepickle.loads(data)
    assert refused in str(info.value)
    assert not marker.exists()


def test_the_hand_made_pickles_do_run_code_without_the_allow_list(tmp_path: Path) -> None:
    """The attacks above are real: plain pickle runs them."""
    marker = tmp_path / "marker"
    pickle.loads(through_an_allowed_package(_write(marker)))
    assert marker.read_text() == "pwned"


def _hist() -> Any:
    import hist

    h = hist.Hist.new.Reg(10, 0, 1, name="x").StrCat([], name="p", growth=True).Weight()
    h.fill(x=[0.1, 0.5], p=["ttbar", "wjets"], weight=[2.0, 1.0])
    return h


def _outputs() -> dict[str, Any]:
    """What analyses return: histograms, coffea accumulators, numpy and awkward arrays, plain containers."""
    import awkward as ak
    import boost_histogram as bh
    from coffea.processor import (
        column_accumulator,
        defaultdict_accumulator,
        dict_accumulator,
        list_accumulator,
        set_accumulator,
        value_accumulator,
    )

    mean = bh.Histogram(bh.axis.Variable([0, 1, 5]), bh.axis.IntCategory([1, 2]), storage=bh.storage.Mean())
    mean.fill([0.5], [1], sample=[3.0])
    return {
        "hist": _hist(),
        "boost_histogram": mean,
        "accumulators": dict_accumulator(
            {
                "n": value_accumulator(int, 7),
                "per": defaultdict_accumulator(float, {"a": 1.5}),
                "cols": column_accumulator(np.arange(4.0)),
                "ls": list_accumulator([1, 2]),
                "set": set_accumulator({"a"}),
            }
        ),
        "numpy": [np.arange(5), np.zeros(2, dtype=[("a", "i4"), ("b", "f8")]), np.float32(1.5)],
        "masked": np.ma.masked_array([1, 2, 3], mask=[False, True, False]),
        "awkward": ak.Array([[1, 2], [], [3]]),
        "plain": (OrderedDict(a=1), defaultdict(list, b=[2]), Counter("aab"), deque([1]), {1, 2}, b"\x00", 1j),
    }


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_the_restricted_unpickler_reads_what_analyses_return(protocol: int) -> None:
    outputs = _outputs()
    back = safepickle.loads(pickle.dumps(outputs, protocol=protocol))
    assert back["hist"] == outputs["hist"]
    assert back["boost_histogram"] == outputs["boost_histogram"]
    assert back["accumulators"]["per"]["a"] == 1.5 and back["accumulators"]["n"].value == 7
    assert back["accumulators"]["cols"].value.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert back["numpy"][1].dtype.names == ("a", "b")
    assert back["masked"].mask.tolist() == [False, True, False]
    assert back["awkward"].tolist() == [[1, 2], [], [3]]
    assert back["plain"] == outputs["plain"]


@dataclass
class Vertex:
    """A class of the analysis's own, to be allowed explicitly."""

    x: float


def test_mqexec_allow_lets_a_named_class_through_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safepickle, "_extra", set())
    data = pickle.dumps([Vertex(1.0)])
    with pytest.raises(UnsafeResultError, match=rf'mqexec.allow\("{__name__}.Vertex"\)'):
        safepickle.loads(data)
    mqexec.allow(f"{__name__}.Vertex")
    assert safepickle.loads(data) == [Vertex(1.0)]
    with pytest.raises(UnsafeResultError, match=r"os\.system"):
        safepickle.loads(one_global("os", "system", "true"))


# -- error descriptions a worker chose -------------------------------------------------------------------------


def descriptions(marker: Path) -> dict[str, tuple[Any, type[BaseException]]]:
    """name → (the ``err`` a worker sends, the type the client must raise)."""
    pickled = base64.b64encode(evil_pickle(marker)).decode()
    return {
        "names os.system": ({"type": "os.system", "args": [f"touch {marker}"], "str": "x"}, RemoteError),
        "a pickle as its argument": ({"type": "builtins.ValueError", "args": [pickled], "str": pickled}, ValueError),
        "a class with its own __init__": (
            {"type": "subprocess.CalledProcessError", "args": [1, ["touch", str(marker)]], "str": "x"},
            RemoteError,
        ),
        "SystemExit": ({"type": "builtins.SystemExit", "args": [0], "str": "0"}, RemoteError),
        "KeyboardInterrupt": ({"type": "builtins.KeyboardInterrupt", "args": [], "str": ""}, RemoteError),
        "asyncio.CancelledError": ({"type": "asyncio.exceptions.CancelledError", "args": []}, RemoteError),
        "a re-exported name": ({"type": "os.error", "args": [str(marker)], "str": "x"}, RemoteError),
        "not a JSON object": (pickled, RemoteError),
        "malformed frames": ({"type": "builtins.KeyError", "args": ["k"], "frames": [["f.py", "x"]]}, RemoteError),
        "a line number of 10**15": (
            {"type": "builtins.KeyError", "args": ["k"], "frames": [["/nowhere/f.py", 10**15, "f", "x = 1"]]},
            KeyError,
        ),
        "causes 900 deep": (_chain(900), RuntimeError),
    }


def _chain(depth: int) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "builtins.RuntimeError", "args": ["bottom"], "str": "bottom"}
    for _ in range(depth):
        d = {"type": "builtins.RuntimeError", "args": ["up"], "str": "up", "cause": d}
    return d


@pytest.mark.parametrize("name", list(descriptions(Path("/nonexistent"))))
def test_rebuilding_an_error_description_never_raises_nor_runs_anything(name: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    described, expected = descriptions(marker)[name]
    started = time.monotonic()
    exc = rebuild(described, "mallory@grid")
    assert type(exc) is expected, exc
    assert "(raised on mqexec worker mallory@grid)" in (exc.__notes__ or [])
    assert time.monotonic() - started < 5
    assert not marker.exists()


def test_a_worker_with_the_real_key_cannot_run_code_on_the_client_through_errors(
    start_worker: Callable[..., Worker], client: mqexec.Client, tmp_path: Path
) -> None:
    """Every description above, validly signed for this session (what a compromised worker can send): each future
    fails at once with the safe type — none stays pending until its real result comes — and nothing runs."""
    start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    cases = descriptions(marker)
    futures = client.map(sleep_then, [20.0] * len(cases), list(cases), batch_size=1, pure=False)
    key = client._identity.trust.result_key(client.session)
    for future, err in zip(futures, [d for d, _ in cases.values()], strict=True):
        mid = sent_message(client, future.key)
        outcome = Outcome(future.key, False, error=err)  # type: ignore[arg-type]
        send_frame(client.config, client.reply_to, outcome_frame(client.session, mid, outcome, key))
    for future, (name, (_, expected)) in zip(futures, cases.items(), strict=True):
        exc = future.exception(timeout=10)
        assert type(exc) is expected, (name, exc)
    assert not marker.exists()


@pytest.mark.parametrize("safe", ["submit(safe=True)", "Client(safe_results=True)"])
def test_a_crafted_value_is_refused_under_safe(
    start_worker: Callable[..., Worker], broker_url: str, settings: dict[str, Any], tmp_path: Path, safe: str
) -> None:
    start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    cases = attacks(marker)
    with mqexec.Client(broker_url, **{**settings, "safe_results": safe.startswith("Client")}) as client:
        per_call = True if safe.startswith("submit") else None  # None: the client's safe_results
        futures = client.map(sleep_then, [20.0] * len(cases), list(cases), batch_size=1, pure=False, safe=per_call)
        key = client._identity.trust.result_key(client.session)
        for future, (data, _) in zip(futures, cases.values(), strict=True):
            mid = sent_message(client, future.key)
            outcome = Outcome(future.key, True, "builtins.int", value=data)
            send_frame(client.config, client.reply_to, outcome_frame(client.session, mid, outcome, key))
        for future, (name, (_, refused)) in zip(futures, cases.items(), strict=True):
            with pytest.raises(UnsafeResultError, match=r"mqexec\.allow") as info:
                future.result(timeout=10)
            assert refused in str(info.value), name
    assert not marker.exists()


def test_a_value_announced_in_pieces_that_never_come_fails_its_future(
    start_worker: Callable[..., Worker], client: mqexec.Client
) -> None:
    start_worker("--concurrency", "1")
    future = client.submit(sleep_then, 20.0, 1, pure=False)
    mid = sent_message(client, future.key)
    key = client._identity.trust.result_key(client.session)
    outcome = Outcome(future.key, True, "builtins.int", pieces=3, size=30, sha="0" * 64)
    send_frame(client.config, client.reply_to, outcome_frame(client.session, mid, outcome, key))
    assert isinstance(future.exception(timeout=10), BrokerError)


class _Recorder(http.server.BaseHTTPRequestHandler):
    """An attacker's web server: answers 404 to everything and keeps the Authorization headers it was sent."""

    seen: ClassVar[list[str]] = []

    def _any(self) -> None:
        self.seen.append(self.headers.get("Authorization") or "")
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PROPFIND = _any

    def log_message(self, *args: Any) -> None:
        pass


def test_a_worker_cannot_make_the_client_fetch_from_a_host_it_chose(
    start_worker: Callable[..., Worker], client: mqexec.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BEARER_TOKEN", "the-analysts-wlcg-token")
    _Recorder.seen.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start_worker("--concurrency", "1")
        future = client.submit(sleep_then, 20.0, 1, pure=False)
        mid = sent_message(client, future.key)
        lake = {
            "url": f"dav://127.0.0.1:{server.server_port}/",
            "size": 1,
            "sha256": "0" * 64,
        }  # its root: a "lake" whose object is itself
        key = client._identity.trust.result_key(client.session)
        outcome = Outcome(future.key, True, "builtins.int", lake=lake)
        send_frame(client.config, client.reply_to, outcome_frame(client.session, mid, outcome, key))
        with pytest.raises(Exception):  # noqa: B017 - whatever it fails with, it must fail
            future.result(timeout=10)
        assert not any("the-analysts-wlcg-token" in h for h in _Recorder.seen), _Recorder.seen
        assert _Recorder.seen == []
    finally:
        server.shutdown()


def add_one(x: int) -> int:
    return x + 1


def test_a_crafted_cache_record_is_refused_under_safe(
    broker_url: str, settings: dict[str, Any], tmp_path: Path
) -> None:
    from mqexec.cache import Cache, memo_key

    marker = tmp_path / "marker"
    cache_url = f"file://{tmp_path / 'cache'}"
    namespace, key = memo_key(add_one, (41,), {})
    assert Cache(cache_url).store(namespace, key, evil_pickle(marker)) is None  # what a worker may write there
    with mqexec.Client(broker_url, **{**settings, "cache_url": cache_url}) as client:
        future = client.submit(add_one, 41, cache=True, safe=True)
        with pytest.raises(UnsafeResultError, match=r"builtins\.exec"):
            future.result(timeout=10)
    assert not marker.exists()


# -- MQExecutor: outputs always through the allow-list ------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """What coffea's Runner hands an executor (only the fields MQExecutor reads)."""

    dataset: str
    filename: str


class Booby:
    """An output whose pickle calls ``exec`` — what a compromised worker can put in place of a histogram."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def booby_output(item: Item) -> Any:
    return {"hist": _hist(), "extra": Booby(item.filename)}


def honest_output(item: Item) -> Any:
    return {"hist": _hist()}


def test_mqexecutor_outputs_go_through_the_allow_list(
    start_worker: Callable[..., Worker], client: mqexec.Client, tmp_path: Path
) -> None:
    from mqexec import MQExecutor

    start_worker("--concurrency", "1")
    marker = tmp_path / "marker"
    executor = MQExecutor(client=client, status=False, retries=0)
    out, _ = executor([Item("ttbar", str(tmp_path / "f.root"))], honest_output, {})
    assert out["hist"].sum().value == 3.0  # histograms come through
    with pytest.raises(UnsafeResultError, match=r'builtins\.exec.*mqexec\.allow\("builtins\.exec"\)'):
        executor([Item("ttbar", str(marker))], booby_output, {})
    assert not marker.exists()
