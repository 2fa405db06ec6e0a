"""The futures API of ``distributed.Client`` that users hit, run against both backends (issue 11).

Every test runs twice, on ``distributed.Client(LocalCluster)`` and on ``mqexec.Client`` with real workers (the
backends and their module-scoped clusters are those of ``test_dask_compat.py``), and asserts the same values,
statuses, types and exceptions. Each expectation was first checked against distributed 2025.3.1; where
distributed does something surprising, the test says so and encodes what it really does. Tests that can only
run on one side say why in their docstring. Generous bounds (``timeout=``) turn a hang into a failure::

    pytest tests/test_futures_compat.py -k mqexec
"""
# ruff: noqa: F811 - the backend fixtures are imported from test_dask_compat and named again as test parameters

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
import traceback
import types
import uuid
import weakref
from collections import namedtuple
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
from test_dask_compat import (  # noqa: F401 - pytest finds the imported fixtures by name in this module
    Backend,
    Point,
    add,
    backend,
    dask_cluster,
    eventually,
    fails,
    ident,
    inc,
    mq_settings,
    pid,
    slow_inc,
)

pytestmark = pytest.mark.timeout(60)


# -- functions the workers run (module level: pickled by reference; tests/ is on the workers' path) -----------


async def async_inc(x: int, delay: float = 0.01) -> int:
    await asyncio.sleep(delay)
    return x + 1


def div(x: float, y: float) -> float:
    return x / y


def dec(x: int) -> int:
    return x - 1


class NewArgs(namedtuple("NewArgs", "ab c")):
    """A namedtuple with a constructor of its own (as in distributed's test_resolves_future_in_namedtuple)."""

    def __new__(cls, a: str, b: str, c: Any) -> NewArgs:
        return super().__new__(cls, f"{a}-{b}", c)

    def __getnewargs__(self) -> tuple[Any, ...]:
        return (*self.ab.split("-"), self.c)


class Box:
    """An object of the user's own that holds a future."""

    def __init__(self, v: Any) -> None:
        self.v = v


def box_content(box: Box) -> Any:
    """The value in the box, or ``(type name, key)`` of what stands in for it."""
    if isinstance(box.v, int):
        return box.v
    return type(box.v).__name__, getattr(box.v, "key", None)


def salt() -> int:
    """A number no other test (or other user of the shared broker) uses: pure keys of its calls are new."""
    return uuid.uuid4().int % 10**12


# -- futures nested in arguments (issue 11, wrong answer 1) ----------------------------------------------------


def test_future_inside_namedtuples_arrives_as_its_value(backend: Backend) -> None:
    c = backend.client
    fut = c.submit(inc, 0)
    assert c.submit(ident, Point(fut, 2)).result(timeout=30) == Point(1, 2)
    assert c.submit(ident, Point([fut, 1], {"k": fut})).result(timeout=30) == Point([1, 1], {"k": 1})
    assert c.submit(ident, NewArgs("a", "b", fut)).result(timeout=30) == NewArgs("a", "b", 1)
    assert c.submit(ident, {"x": fut, "y": (fut, 2)}).result(timeout=30) == {"x": 1, "y": (1, 2)}


def test_future_inside_a_custom_object_is_never_its_key_string(backend: Backend) -> None:
    """distributed does not look inside objects of the user's own: the function gets a ``Future`` handle of the
    same key (checked: its ``.result()`` on the worker raises "not properly initialized"). The value is accepted
    as well; what must not happen is the bare key string silently standing in for the value."""
    c = backend.client
    fut = c.submit(inc, 0)
    assert c.submit(box_content, Box(fut)).result(timeout=30) in (1, ("Future", fut.key))


# -- cancel, resubmit, keys (issue 11, wrong answers 2 and 3) --------------------------------------------------


def test_cancel_then_resubmit_the_same_pure_call_completes(backend: Backend) -> None:
    """Finished, running, queued and mapped calls: cancelled, then the same pure calls (same keys) resubmitted.

    One round trip (``barrier``) separates the two: distributed's cancel reaches its scheduler asynchronously
    and, without it, distributed itself cancels the resubmitted future in most runs (measured: 15 of 20)."""
    c = backend.client
    s = salt()

    def barrier() -> None:
        assert c.submit(inc, s, pure=False).result(timeout=30) == s + 1

    finished = c.submit(inc, s + 2)
    assert finished.result(timeout=30) == s + 3
    running = c.submit(slow_inc, s + 1, 1.0)
    time.sleep(0.3)  # let it start (not asserted: it may still be queued on a slow machine)
    busy = [c.submit(slow_inc, i, 1.5, pure=False) for i in range(2)]  # the workers stay busy
    queued = c.submit(slow_inc, s, 0.0)
    mapped = c.map(slow_inc, range(s + 10, s + 30), [0.0] * 20)
    c.cancel([queued, running, finished, *mapped])
    assert [f.status for f in [queued, running, *mapped]] == ["cancelled"] * 22  # finished: see its own test
    barrier()

    again = [c.submit(slow_inc, s, 0.0), c.submit(slow_inc, s + 1, 1.0), c.submit(inc, s + 2)]
    again_mapped = c.map(slow_inc, range(s + 10, s + 30), [0.0] * 20)
    assert [f.key for f in again] == [queued.key, running.key, finished.key]
    assert [f.key for f in again_mapped] == [f.key for f in mapped]
    assert [f.result(timeout=30) for f in again] == [s + 1, s + 2, s + 3]
    assert [f.result(timeout=30) for f in again_mapped] == list(range(s + 11, s + 31))
    assert c.gather(busy) == [1, 2]


def test_map_with_the_same_key_prefix_twice_returns_each_maps_own_results(backend: Backend) -> None:
    c = backend.client
    first = c.map(inc, [1, 2, 3], key="INC")
    second = c.map(inc, [10, 20, 30], key="INC")
    assert [f.result(timeout=30) for f in first] == [2, 3, 4]
    assert [f.result(timeout=30) for f in second] == [11, 21, 31]
    assert all(str(f.key).startswith("INC") for f in first + second)
    assert not {f.key for f in first} & {f.key for f in second}
    assert [f.key for f in c.map(inc, [1, 2, 3], key="INC")] == [f.key for f in first]  # same inputs, same keys


def test_tuple_keys_on_submit_and_map(backend: Backend) -> None:
    c = backend.client
    x = c.submit(inc, 1, key=("x", 0, 1))
    assert x.key == ("x", 0, 1) and x.result(timeout=30) == 2
    y = c.submit(inc, x, key=("y", 0, 1))
    assert y.result(timeout=30) == 3
    assert c.gather([x, y]) == [2, 3]
    mapped = c.map(inc, [5, 6], key=[("m", 0), ("m", 1)])
    assert [f.key for f in mapped] == [("m", 0), ("m", 1)]
    assert [f.result(timeout=30) for f in mapped] == [6, 7]


# -- cancellation semantics -----------------------------------------------------------------------------------


def test_cancelling_a_finished_future(backend: Backend) -> None:
    """distributed cancels it (its result is released): status ``cancelled``, ``result()`` raises."""
    c = backend.client
    fut = c.submit(inc, salt())
    fut.result(timeout=30)
    fut.cancel()
    assert fut.status == "cancelled" and fut.cancelled()
    with pytest.raises(CancelledError):
        fut.result(timeout=5)


def test_dependents_of_a_cancelled_future_end_cancelled(backend: Backend) -> None:
    """As distributed's test_cancel_sync: x → y → z, cancel y; z ends ``cancelled`` (not ``error``), x runs."""
    c = backend.client
    s, tag = salt(), uuid.uuid4().hex[:8]
    x = c.submit(slow_inc, s, 0.5, key=f"x-{tag}")
    y = c.submit(slow_inc, x, 1.0, key=f"y-{tag}")
    z = c.submit(slow_inc, y, 0.5, key=f"z-{tag}")
    c.cancel([y])
    assert eventually(z.cancelled, 30)
    assert (y.status, z.status) == ("cancelled", "cancelled")
    with pytest.raises(CancelledError):
        z.result(timeout=5)
    assert x.result(timeout=30) == s + 1
    with pytest.raises(CancelledError):
        c.submit(inc, y).result(timeout=30)


# -- arguments distributed accepts: durations, direct=, async functions ---------------------------------------


def test_string_durations_for_timeouts(backend: Backend) -> None:
    """distributed parses ``"500 ms"``/``"10s"`` wherever a timeout is taken: ``result``, ``exception``,
    ``traceback``, ``wait``, ``as_completed`` (``gather`` has no timeout in distributed)."""
    c = backend.client
    slow = c.submit(slow_inc, 1, 3.0, pure=False)
    for call in (
        lambda: slow.result(timeout="500 ms"),
        lambda: slow.exception(timeout="500ms"),
        lambda: slow.traceback(timeout="0.5s"),
        lambda: backend.wait([slow], timeout="500 ms"),
        lambda: next(backend.as_completed([slow], timeout="500 ms")),
    ):
        with pytest.raises(TimeoutError):
            call()
    assert slow.result(timeout="10s") == 2
    done, _ = backend.wait([slow], timeout="10s")
    assert done == {slow}
    assert [f.result() for f in backend.as_completed([slow], timeout="10 s")] == [2]
    bad = c.submit(fails, 1)
    assert isinstance(bad.exception(timeout="10s"), KeyError)
    assert bad.traceback(timeout="10s") is not None


def test_direct_is_accepted_on_scatter_and_gather(backend: Backend) -> None:
    c = backend.client
    [x] = c.scatter([41], direct=True)
    assert c.gather([x], direct=True) == [41]
    y = c.scatter(1, direct=False)
    assert c.gather(y, direct=False) == 1
    assert c.submit(add, x, y).result(timeout=30) == 42


def test_async_functions_are_awaited_on_the_worker(backend: Backend) -> None:
    c = backend.client
    assert c.submit(async_inc, 1).result(timeout=30) == 2
    assert c.submit(async_inc, 1, delay=0.05).result(timeout=30) == 2
    assert [f.result(timeout=30) for f in c.map(async_inc, [1, 2, 3])] == [2, 3, 4]


# -- the Future object ----------------------------------------------------------------------------------------


def test_future_type_and_repr(backend: Backend) -> None:
    c = backend.client
    slow = c.submit(slow_inc, 1, 2.0, pure=False)
    assert slow.type is None
    fut = c.submit(inc, 1)
    assert fut.result(timeout=30) == 2 and fut.type is int
    assert repr(fut) == f"<Future: finished, type: int, key: {fut.key}>"
    half = c.submit(div, 1, 2)
    assert half.result(timeout=30) == 0.5 and half.type is float


def test_future_repr_html_for_notebooks(backend: Backend) -> None:
    c = backend.client
    fut = c.submit(inc, 3)
    fut.result(timeout=30)
    html = fut._repr_html_()
    assert isinstance(html, str) and "finished" in html and fut.key in html and "int" in html
    assert isinstance(c._repr_html_(), str) and c._repr_html_()


def test_futures_are_weak_referenceable(backend: Backend) -> None:
    fut = backend.client.submit(inc, 4)
    assert fut.result(timeout=30) == 5
    assert fut in weakref.WeakSet([fut])
    assert weakref.ref(fut)() is fut


# -- as_completed -------------------------------------------------------------------------------------------


def test_as_completed_counts_has_ready_update_and_batches(backend: Backend) -> None:
    c = backend.client
    futures = [c.submit(slow_inc, i, 1.0, pure=False) for i in range(3)]
    ac = backend.as_completed(futures)
    assert repr(ac) == "<as_completed: waiting=3 done=0>" and ac.count() == 3 and not ac.has_ready()
    backend.wait(futures, timeout=30)
    assert eventually(lambda: repr(ac) == "<as_completed: waiting=0 done=3>")
    assert ac.has_ready() and ac.count() == 3
    extra = c.submit(inc, 10, pure=False)
    ac.update([extra])
    batches = list(ac.batches())
    assert all(batches) and sorted(f.key for b in batches for f in b) == sorted(f.key for f in [*futures, extra])
    assert ac.is_empty() and ac.count() == 0
    with_results = list(backend.as_completed(futures, with_results=True).batches())
    assert sorted(value for batch in with_results for _, value in batch) == [1, 2, 3]


def test_as_completed_with_results_yields_cancelled_error_for_a_cancelled_future(backend: Backend) -> None:
    c = backend.client
    running = c.submit(slow_inc, 6, 3.0, pure=False)
    ok = c.submit(inc, 2, pure=False)
    ac = backend.as_completed([running, ok], with_results=True)
    running.cancel()
    got = {f.key: value for f, value in ac}
    assert isinstance(got[running.key], CancelledError) and got[ok.key] == 3


def test_as_completed_raise_errors_false_yields_type_exception_traceback(backend: Backend) -> None:
    c = backend.client
    bad, good = c.submit(fails, 9), c.submit(inc, 1)
    got = {f.key: value for f, value in backend.as_completed([bad, good], with_results=True, raise_errors=False)}
    typ, exc, tb = got[bad.key]
    assert typ is KeyError and isinstance(exc, KeyError) and isinstance(tb, types.TracebackType)
    assert "fails" in [frame.name for frame in traceback.extract_tb(tb)]
    assert got[good.key] == 2
    with pytest.raises(KeyError):
        list(backend.as_completed([bad], with_results=True))


# -- debugging and executors ------------------------------------------------------------------------------------


def test_recreate_error_locally_and_recreate_task_locally(backend: Backend) -> None:
    """As distributed's test_recreate_error_sync/test_recreate_task_sync: the failed (or any) task runs again
    in this process, with its arguments' values."""
    c = backend.client
    bad = c.submit(div, 1, c.submit(dec, 1))
    backend.wait([bad], timeout=30)
    assert bad.status == "error"
    with pytest.raises(ZeroDivisionError) as info:
        c.recreate_error_locally(bad)
    assert traceback.extract_tb(info.value.__traceback__)[-1].name == "div"
    assert bad.status == "error"
    ok = c.submit(div, 1, 2)
    backend.wait([ok], timeout=30)
    with pytest.raises(ValueError):
        c.recreate_error_locally(ok)
    assert c.recreate_task_locally(c.submit(sum, [c.submit(inc, 1), c.submit(inc, 2)])) == 5
    assert c.recreate_task_locally(c.submit(pid, pure=False)) == os.getpid()


def _fails_once(marker: str) -> str:
    if not os.path.exists(marker):
        Path(marker).write_text("failed once")
        raise RuntimeError("first attempt fails")
    return "second attempt"


def test_retry_runs_a_failed_future_again(backend: Backend, tmp_path: Path) -> None:
    fut = backend.client.submit(_fails_once, str(tmp_path / f"marker-{uuid.uuid4().hex}"))
    with pytest.raises(RuntimeError, match="first attempt fails"):
        fut.result(timeout=30)
    fut.retry()
    assert fut.result(timeout=30) == "second attempt" and fut.status == "finished"


def _touch(path: str) -> None:
    time.sleep(0.5)
    Path(path).write_text("ran")


def test_fire_and_forget_runs_without_a_handle(backend: Backend, tmp_path: Path) -> None:
    marker = tmp_path / f"fired-{uuid.uuid4().hex}"
    backend.lib.fire_and_forget(backend.client.submit(_touch, str(marker)))  # no handle kept
    assert eventually(marker.exists, timeout=30)


def test_get_executor_is_a_concurrent_futures_executor(backend: Backend) -> None:
    c = backend.client
    with c.get_executor() as ex:
        assert isinstance(ex, cf.Executor)
        fut = ex.submit(add, 1, y=2)
        assert isinstance(fut, cf.Future) and fut.result(timeout=30) == 3
        with pytest.raises(KeyError):
            ex.submit(fails, 1).result(timeout=30)
        assert list(ex.map(inc, [1, 2, 3], timeout=30)) == [2, 3, 4]
        many = [ex.submit(inc, i) for i in range(5)]
        assert sorted(f.result() for f in cf.as_completed(many, timeout=30)) == [1, 2, 3, 4, 5]
        done, not_done = cf.wait(many, timeout=30)
        assert done == set(many) and not not_done
    ex = c.get_executor(pure=False)
    last = ex.submit(slow_inc, 1, 0.5)
    ex.shutdown(wait=True)
    assert last.result(timeout=30) == 2
    with pytest.raises(RuntimeError):
        ex.submit(inc, 1)


# -- tracebacks ------------------------------------------------------------------------------------------------


def _library_frames(frames: traceback.StackSummary, backend: Backend) -> list[str]:
    package = Path(backend.lib.__file__).resolve().parent
    return [frame.name for frame in frames if Path(frame.filename).resolve().is_relative_to(package)]


def _raise_line() -> int:
    return fails.__code__.co_firstlineno + 1  # the line of its ``raise``


def test_traceback_object_holds_the_remote_frame_and_no_library_frame(backend: Backend) -> None:
    fut = backend.client.submit(fails, 10)
    backend.wait([fut], timeout=30)
    tb = fut.traceback()
    assert isinstance(tb, types.TracebackType)
    frames = traceback.extract_tb(tb)
    assert (frames[-1].filename, frames[-1].lineno, frames[-1].name) == (
        fails.__code__.co_filename,
        _raise_line(),
        "fails",
    )
    assert _library_frames(frames, backend) == []


def test_stored_traceback_does_not_grow_with_each_result_call(backend: Backend) -> None:
    fut = backend.client.submit(fails, 11)
    backend.wait([fut], timeout=30)

    def raised_frames() -> int:
        with pytest.raises(KeyError) as info:
            fut.result(timeout=30)
        return len(traceback.extract_tb(info.value.__traceback__))

    raised, stored = [], []
    for _ in range(3):
        raised.append(raised_frames())
        stored.append(len(traceback.extract_tb(fut.traceback())))
    assert raised[2] == raised[0] and stored[2] == stored[0]


def test_users_traceback_has_the_remote_frame_and_only_the_result_frame_of_the_library(backend: Backend) -> None:
    """What distributed shows: this test's line, its own ``Future.result`` frame (a frame that raises is always
    in the traceback), then the remote function's frames — none of its client or worker internals."""
    fut = backend.client.submit(fails, 12)
    with pytest.raises(KeyError) as info:
        fut.result(timeout=30)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[0].name == "test_users_traceback_has_the_remote_frame_and_only_the_result_frame_of_the_library"
    assert (frames[-1].filename, frames[-1].lineno, frames[-1].name) == (
        fails.__code__.co_filename,
        _raise_line(),
        "fails",
    )
    assert _library_frames(frames, backend) == ["result"]


_WITHOUT_DISTRIBUTED = """
import json, sys, traceback
import mqexec

try:
    import distributed
except ImportError:
    pass
else:
    sys.exit("distributed is importable: the blocker did not work")

def fails(x):
    raise KeyError(x)

with mqexec.Client(sys.argv[1]) as client:
    fut = client.submit(fails, 1)
    mqexec.wait([fut], timeout=30)
    frames = traceback.extract_tb(fut.traceback())
    print(json.dumps([[f.filename, f.lineno, f.name] for f in frames]))
"""


def test_traceback_has_real_frames_when_distributed_is_not_installed(
    broker_url: str, settings: dict[str, Any], start_worker: Any, tmp_path: Path
) -> None:
    """mqexec-only by nature (distributed cannot be absent from its own run). A ``distributed`` package that
    refuses to import comes first on the path of the worker and of the client script, as if not installed."""
    from workerproc import ROOT

    blocker = tmp_path / "blocker"
    (blocker / "distributed").mkdir(parents=True)
    (blocker / "distributed" / "__init__.py").write_text('raise ImportError("distributed is not installed")\n')
    start_worker(env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    script = tmp_path / "script.py"
    script.write_text(_WITHOUT_DISTRIBUTED)
    env = {**os.environ, "PYTHONPATH": str(blocker), **{f"MQEXEC_{k.upper()}": str(v) for k, v in settings.items()}}
    proc = subprocess.run(
        [sys.executable, str(script), broker_url], env=env, capture_output=True, text=True, timeout=50, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    frames = json.loads(proc.stdout.splitlines()[-1])
    assert [str(script), _WITHOUT_DISTRIBUTED.splitlines().index("    raise KeyError(x)") + 1, "fails"] in frames
    assert not [f for f in frames if "/mqexec/" in f[0]]
