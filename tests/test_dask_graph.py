"""The dask side of mqexec: ``client.get`` (every graph form, graph fusion), ``compute``/``persist``/``futures_of``
as in ``distributed``, dataframes (aliases, shuffles), ``dask.annotate(retries=)``, and coffea's dask paths.

Graph fusion is checked by counting: ``mqexec.adapters.dask.STATS["tasks"]`` is the number of mqexec tasks
(broker messages out; as many results come back) that a computation cost, and it must grow like the number
of partitions N, not like the number of dask tasks. Where ``distributed`` defines the behaviour, the same call
goes to a ``distributed.Client`` on an in-process ``LocalCluster`` and the answers are compared.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mqexec
from mqexec.adapters import dask as mqdask

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
pytest.importorskip("coffea.processor")
from coffea import processor  # noqa: E402
from dask._task_spec import Alias, DataNode, Task, TaskRef  # noqa: E402


def double(x: Any) -> Any:
    return 2 * x


def boom(x: Any) -> Any:
    raise ValueError(f"boom at {x!r}")


def read(i: int) -> np.ndarray:
    return np.arange(1000) + i


def tally(*parts: Any) -> Any:
    return sum(parts)


@pytest.fixture
def worker(start_worker):
    return start_worker("--concurrency", "2")


@pytest.fixture(autouse=True)
def _fresh_stats():
    mqdask.STATS.clear()


# -- graph forms -------------------------------------------------------------------------------------------


def test_every_task_spec_form_and_nested_keys(worker, client):
    big = np.arange(100_000)  # > 64 KiB: scattered once instead of copied into each chain
    dsk = {
        "a": 1,  # legacy literal
        "b": (operator.add, "a", 2),  # legacy tuple
        "c": Task("c", operator.mul, TaskRef("b"), 10),  # Task + TaskRef
        "d": Alias("d", "c"),  # Alias
        "e": DataNode("e", [1, 2]),  # DataNode
        "f": Task("f", operator.add, TaskRef("a"), TaskRef("c")),  # several TaskRefs
        "big": DataNode("big", big),
        "g": Task("g", np.sum, TaskRef("big")),
        ("x", 0): (double, "d"),  # tuple keys
        ("x", 1): (double, ("x", 0)),
        "h": Alias("c"),  # an alias whose own key is its target's, stored under another key (df.loc does this)
        "i": Task("i", double, TaskRef("h")),
    }
    out = client.get(dsk, ["d", ["a", "b", ["e"]], "f", "g", ("x", 1), "h", "i"])
    assert out == [30, [1, 3, [[1, 2]]], 31, big.sum(), 120, 30, 60]
    assert client.get(dsk, "c") == 30
    assert mqdask.STATS["scattered"] >= 1
    assert dask.compute(dask.delayed(double)(dask.delayed(double)(3)), scheduler=client.get) == (12,)


def test_sync_false_returns_futures_in_the_same_structure(worker, client):
    dsk = {"a": (double, 4), "b": (double, "a"), "k": 7, "d": DataNode("d", {"x": [1, 2]})}
    futs = client.get(dsk, ["b", ["a", "k", "d"]], sync=False)
    assert all(isinstance(f, mqexec.Future) for f in [futs[0], *futs[1]])  # a dict constant too: one future
    assert client.gather(futs) == [16, [8, 7, {"x": [1, 2]}]]


def test_error_in_a_chain_raises_the_original_exception(worker, client):
    dsk = {("r", i): (read, i) for i in range(4)}
    dsk[("bad", 0)] = (boom, ("r", 0))
    dsk["sum"] = (tally, *[("r", i) for i in range(1, 4)], ("bad", 0))
    with pytest.raises(ValueError, match="boom at"):
        client.get(dsk, "sum")


class _NoSend:
    """A client that fails the test if anything is submitted."""

    def submit(self, *args, **kwargs):
        raise AssertionError("a task was sent for a graph that should have been refused")

    scatter = get = submit


@pytest.mark.parametrize(
    "dsk, message",
    [
        ({"a": Task("a", abs, TaskRef("missing"))}, "'a' depends on 'missing'"),
        ({"a": 1, "b": Task("b", abs, TaskRef("a"))}, "'nope' was asked for"),
        (
            {
                "a": Task("a", abs, TaskRef("c")),
                "b": Task("b", abs, TaskRef("a")),
                "c": Task("c", abs, TaskRef("b")),
                "out": Task("out", abs, TaskRef("c")),
            },
            "cycle: ",
        ),
        ({("p", 0): (operator.neg, ("p", 1)), ("p", 1): (operator.neg, ("p", 0))}, r"cycle: \('p', [01]\)"),
    ],
)
def test_bad_graphs_are_refused_before_anything_is_sent(dsk, message):
    keys = ["nope"] if "'nope'" in message else [next(iter(reversed(dsk)))]
    with pytest.raises(ValueError, match=message):
        mqdask.get(_NoSend(), dsk, keys)
    assert mqdask.STATS["tasks"] == 0


# -- fusion ------------------------------------------------------------------------------------------------


def _partitioned(n: int) -> Any:
    x = da.arange(n * 200, chunks=200)
    y = (x + 1) * 2 - x
    return y.sum(), y.max(), (y**2).mean()


@pytest.mark.parametrize("n", [8, 32])
def test_messages_grow_with_partitions_not_with_tasks(worker, client, n):
    sums = _partitioned(n)
    expected = dask.compute(*sums, scheduler="sync")
    assert dask.compute(*sums, scheduler=client.get) == pytest.approx(expected)
    stats = dict(mqdask.STATS)
    assert stats["dask_tasks"] >= 3 * n
    # one chain per partition (all three reductions' partial sums of a partition together), plus the
    # reduction tree of each output as one chain
    assert stats["tasks"] <= n + 3, stats


def test_partition_chains_export_only_what_reductions_read():
    """A diamond per partition (read → two selections → fill) stays on one worker; only fills leave it."""
    n = 16
    dsk: dict[Any, Any] = {}
    for i in range(n):
        dsk[("read", i)] = (read, i)
        dsk[("even", i)] = (operator.getitem, ("read", i), slice(0, None, 2))
        dsk[("odd", i)] = (operator.getitem, ("read", i), slice(1, None, 2))
        dsk[("fill", i)] = (operator.add, ("even", i), ("odd", i))
    for j in range(n // 8):
        dsk[("combine", j)] = (tally, *[("fill", i) for i in range(8 * j, 8 * j + 8)])
    dsk["total"] = (tally, *[("combine", j) for j in range(n // 8)])
    p = mqdask.plan(dsk, ["total"])
    assert len(p.chains) == n + 1
    for chain in p.chains[:n]:
        assert len(chain.keys) == 4 and chain.exports == {chain.keys[-1]} and chain.keys[-1][0] == "fill"
    assert p.chains[-1].exports == {"total"} and len(p.chains[-1].upstream) == n


def test_broadcast_keeps_partitions_apart(worker, client):
    x = da.arange(1600, chunks=100)
    y = x / x.max()  # every partition reads the global max
    expected = y.compute(scheduler="sync")
    (got,) = dask.compute(y, scheduler=client.get)
    np.testing.assert_allclose(got, expected)
    graph, key = mqdask.collection_graph(y)
    p = mqdask.plan(graph, [key])
    assert len(p.chains) >= 16 + 16  # partition chains feeding the max, and one chain per normalised part


def test_client_compute_gives_a_future_of_the_final_value(worker, client):
    x = da.arange(1000, chunks=100)
    fut = client.compute(x.sum())
    assert isinstance(fut, mqexec.Future) and fut.result(timeout=60) == 499500
    assert mqdask.STATS["tasks"] <= 10 + 1


# -- compute, persist, futures_of: as distributed ------------------------------------------------------------


@pytest.fixture
def dist_client():
    """A ``distributed.Client`` on an in-process LocalCluster, not made dask's default (that would change the
    shuffle method dask picks and the default scheduler of the other tests)."""
    import distributed

    with (
        distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc,
        distributed.Client(lc, set_as_default=False) as dc,
    ):
        yield dc


def _futures_marked(obj: Any) -> Any:
    """``obj`` with every future (mqexec's or distributed's) replaced by "future": where compute put futures."""
    if type(obj).__name__ == "Future":
        return "future"
    if isinstance(obj, list):
        return [_futures_marked(x) for x in obj]
    return obj


def test_compute_containers_like_distributed(worker, client, dist_client):
    x = da.arange(10, chunks=5)
    cases = [{"x": [x], "y": 123}, [x.sum(), 5, [x.sum()], {"a": 1}], [[1, 2]], 7, (1,), {"a": 1}, (x.sum(),)]
    for case in cases:
        ours, theirs = client.compute(case), dist_client.compute(case)
        assert _futures_marked(ours) == _futures_marked(theirs), case
        np.testing.assert_equal(client.gather(ours), dist_client.gather(theirs))
    assert client.compute({"x": [x], "y": 123}, sync=True)["y"] == 123
    d = dask.delayed(double)(4)
    assert client.compute(d).key == d.key == dist_client.compute(d).key  # a delayed value's future: its key
    assert client.compute([{"x": [x]}], traverse=False) == [{"x": [x]}]  # not looked into, as in distributed


def test_compute_sends_several_collections_as_one_graph(worker, client):
    x = da.arange(1000, chunks=100)
    fsum, fmax = client.compute([x.sum(), x.max()])
    assert (fsum.result(timeout=60), fmax.result(timeout=60)) == (499500, 999)
    assert mqdask.STATS["graphs"] == 1
    assert mqdask.STATS["tasks"] <= 10 + 2, dict(mqdask.STATS)  # x's partitions are read once for both


def tick(block: np.ndarray, path: str) -> np.ndarray:
    """Count calls in a file (one line each): shows whether persisted partitions are computed again."""
    with open(path, "a") as f:
        f.write("call\n")
    return block


def _ticking_array(path: Path) -> Any:
    return da.arange(1000, chunks=100).map_blocks(tick, path=str(path), meta=np.array((), dtype=np.int64)) ** 2


def test_persist_holds_futures_and_later_computations_reuse_them(worker, client, dist_client, tmp_path):
    import distributed

    x = _ticking_array(tmp_path / "ours")
    xp = mqdask.persist(client, x)
    futures = mqdask.futures_of(xp)
    assert len(futures) == 10 and all(isinstance(f, mqexec.Future) for f in futures)
    assert len(distributed.futures_of(dist_client.persist(_ticking_array(tmp_path / "theirs")))) == 10
    done, not_done = mqexec.wait(futures, timeout=60)
    assert len(done) == 10 and not not_done
    assert (tmp_path / "ours").read_text().count("call") == 10
    expected = dask.compute(x.sum(), x[::7], scheduler="sync")  # runs tick 10 more times, in this process
    got = dask.compute(xp.sum(), xp[::7], scheduler=client.get, optimize_graph=False)
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert client.compute(xp.max(), optimize_graph=False).result(timeout=60) == 999**2
    assert (tmp_path / "ours").read_text().count("call") == 10 + 10  # the workers did not compute x again

    with pytest.raises(TypeError, match=r"persist takes dask collections .* not list"):
        mqdask.persist(client, [x, [1, 2]])


def test_persist_several_kinds_in_a_list(worker, client):
    import dask.dataframe as dd  # pandas and pyarrow come with coffea, which this module needs anyway
    import pandas as pd

    pdf = pd.DataFrame({"a": range(40), "b": np.arange(40) % 7})
    six = dask.delayed(sum)([1, 2, 3])
    arr, total, frame = mqdask.persist(client, (da.arange(100, chunks=30), six, dd.from_pandas(pdf, npartitions=4)))
    assert len(mqdask.futures_of([arr, total, frame])) == 4 + 1 + 4
    assert [f.key for f in mqdask.futures_of(total)] == [six.key]  # named by the dask key, as in distributed
    np.testing.assert_array_equal(dask.compute(arr, scheduler=client.get)[0], np.arange(100))
    assert dask.compute(total + 1, scheduler=client.get) == (7,)
    # the persisted frame's graph aliases its new partition keys to the futures' keys; .loc adds more aliases
    (got,) = dask.compute(frame.loc[5:25], scheduler=client.get)
    pd.testing.assert_frame_equal(got, pdf.loc[5:25])


def test_futures_of_nested_containers_and_collections(worker, client, dist_client):
    import distributed

    ours = [client.submit(double, i) for i in range(3)]
    theirs = [dist_client.submit(double, i) for i in range(3)]

    def nest(f):
        return [f[0], {"a": (f[1], [f[2], f[0]]), "b": {f[1]}}, 5, "text"]

    assert [f.key for f in mqdask.futures_of(nest(ours))] == [f.key for f in ours]
    assert {f.key for f in distributed.futures_of(nest(theirs))} == {f.key for f in theirs}
    # distributed 2025.3 finds a future inside a delayed call too (dask makes it a dependency); 2026 does not
    assert [f.key for f in mqdask.futures_of(dask.delayed(double)(ours[2]))] == [ours[2].key]
    assert mqdask.futures_of(ours[1]) == [ours[1]]
    assert mqdask.futures_of(f for f in ours) == mqdask.futures_of({i: f for i, f in enumerate(ours)}.values()) == ours
    assert mqdask.futures_of(da.ones(4, chunks=2)) == [] == distributed.futures_of(da.ones(4, chunks=2))
    assert mqdask.futures_of(7) == []


def test_a_future_as_a_graph_value_is_passed_along(worker, client):
    fut = client.submit(double, 21)
    assert client.get({"x": fut, "y": (double, "x")}, ["y", "x"]) == [84, 42]
    futs = client.get({"x": fut, "y": (double, "x")}, ["x", "y"], sync=False)
    assert futs[0].key == fut.key and futs[1].result(timeout=60) == 84


def test_a_future_inside_a_task_reaches_the_function_as_its_value(worker, client):
    fut = client.submit(double, 21)
    assert client.get({"y": (double, fut)}, "y") == 84
    assert dask.compute(dask.delayed(double)(fut), scheduler=client.get) == (84,)


def test_a_persisted_array_whose_futures_dask_fuses_into_tasks(worker, client):
    xp = mqdask.persist(client, da.arange(1000, chunks=100) ** 2)
    assert client.compute(xp.max()).result(timeout=60) == 999**2
    assert dask.compute(xp.sum(), scheduler=client.get) == (sum(i * i for i in range(1000)),)


# -- dataframes: aliases and shuffles ----------------------------------------------------------------------


def _frames() -> tuple[Any, Any]:
    import pandas as pd

    rng = np.random.default_rng(7)
    left = pd.DataFrame({"k": rng.integers(0, 50, 400), "v": np.arange(400)})
    right = pd.DataFrame({"k": np.arange(50), "w": np.arange(50) * 10})
    return left, right


def test_dataframe_loc_and_task_based_shuffles_match_sync(worker, client):
    import dask.dataframe as dd
    import pandas as pd

    left, right = _frames()
    df, other = dd.from_pandas(left, npartitions=8), dd.from_pandas(right, npartitions=4)
    indexed = dd.from_pandas(left.set_index("v"), npartitions=8)
    cases = {
        "loc slice": indexed.loc[30:250],  # alias nodes under their own keys
        "loc list": indexed.loc[[3, 77, 390]],
        "set_index": df.set_index("k"),
        "shuffle": df.shuffle("k"),
        "merge": df.merge(other, on="k", how="inner", shuffle_method=None, broadcast=False),
        "groupby": df.groupby("k").v.sum(split_out=4),
    }
    for name, frame in cases.items():
        (expected,) = dask.compute(frame, scheduler="sync")
        (got,) = dask.compute(frame, scheduler=client.get)  # the client fixture is inside `with client:`
        assert len(got) == len(expected) > 0, name
        if name.startswith("loc"):
            pd.testing.assert_frame_equal(got, expected)
        else:  # rows move between partitions: compare them in one order
            pd.testing.assert_frame_equal(_rows(got), _rows(expected))
    assert dask.compute(cases["set_index"], scheduler=client.get)[0].index.is_monotonic_increasing


def _rows(frame: Any) -> Any:
    table = frame.reset_index()
    return table.sort_values(list(table.columns)).reset_index(drop=True)


def test_shuffle_method_inside_with_client_and_refused_local_shuffles():
    import dask.dataframe as dd
    from dask.utils import get_default_shuffle_method

    left, _ = _frames()
    df = dd.from_pandas(left, npartitions=4)
    with dask.config.set({"dataframe.shuffle.method": None}):
        assert get_default_shuffle_method() == "disk"  # dask's choice when there is no distributed client
        with mqdask.default_scheduler(_NoSend()):
            assert get_default_shuffle_method() == "tasks"
        graph, key = mqdask.collection_graph(df.set_index("k"))  # compute/persist build with "tasks" too
        assert mqdask.plan(graph, [key]).chains
        dsk = df.set_index("k").__dask_graph__()  # what dask.compute hands a scheduler outside `with client:`
        with pytest.raises(ValueError, match=r"on-disk shuffle \(dataframe.shuffle.method 'disk', partd"):
            mqdask.get(_NoSend(), dsk, df.set_index("k").__dask_keys__())
    with dask.config.set({"dataframe.shuffle.method": "disk"}):  # the user's own choice stays ...
        with mqdask.default_scheduler(_NoSend()):
            assert get_default_shuffle_method() == "disk"
        graph, key = mqdask.collection_graph(df.shuffle("k"))
        with pytest.raises(ValueError, match="on-disk shuffle"):  # ... and is refused before anything is sent
            mqdask.get(_NoSend(), graph, [key])
    with dask.config.set({"dataframe.shuffle.method": "p2p"}):
        graph, key = mqdask.collection_graph(df.shuffle("k"))
        with pytest.raises(ValueError, match=r"peer-to-peer shuffle .* only on distributed's workers"):
            mqdask.get(_NoSend(), graph, [key])
    assert mqdask.STATS["tasks"] == 0


# -- dask.annotate(retries=) -------------------------------------------------------------------------------


def flaky(path: str, fails: int) -> int:
    """Raise on the first ``fails`` calls (counted in a file), then return the number of calls."""
    p = Path(path)
    n = int(p.read_text()) if p.exists() else 0
    p.write_text(str(n + 1))
    if n < fails:
        raise RuntimeError(f"attempt {n + 1} fails")
    return n + 1


def test_annotate_retries_like_distributed(worker, client, dist_client, tmp_path):
    def call(name: str) -> Any:
        return dask.delayed(flaky, pure=False)(str(tmp_path / name), 2) + 0  # a two-task graph

    with dask.annotate(retries=2):
        annotated = [call(name) for name in ("ours", "ours-compute", "theirs")]
    assert dask.compute(annotated[0], scheduler=client.get) == (3,)  # two failures, then the third attempt
    assert client.compute(annotated[1]).result(timeout=60) == 3
    assert dist_client.compute(annotated[2]).result(timeout=60) == 3

    plain = call("plain")
    with pytest.raises(RuntimeError, match="attempt 1 fails"):
        dask.compute(plain, scheduler=client.get)
    assert (tmp_path / "plain").read_text() == "1"
    with dask.annotate(retries=2):  # around the call: applies to every task, as distributed's submit does
        assert dask.compute(call("around"), scheduler=client.get) == (3,)
        assert dist_client.compute(call("around-theirs")).result(timeout=60) == 3
    with dask.annotate(retries=lambda key: 2):  # a function of the key, as dask.annotate allows
        assert dask.compute(call("function"), scheduler=client.get) == (3,)
    with dask.annotate(retries=1), pytest.raises(RuntimeError, match="attempt 2 fails"):  # too few: the last error
        dask.compute(call("short"), scheduler=client.get)


# -- coffea ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nanoaod_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from synthetic import write_nanoaod

    tmp = tmp_path_factory.mktemp("nanoaod")
    return {
        "ttbar": write_nanoaod(tmp / "ttbar.root", 40_000, seed=1, process="ttbar"),
        "wjets": write_nanoaod(tmp / "wjets.root", 20_000, seed=2, process="wjets"),
    }


@pytest.fixture
def dask_awkward():
    """dask-awkward (2026.2.1 pins dask < 2025.4) on dask 2026: its "layer-chains" optimisation builds
    fused tasks that dask 2026 refuses ("Cannot fuse tasks with multiple outputs"), under any scheduler,
    ``"sync"`` included; the column optimisation works. Turn the former off for these tests."""
    dak = pytest.importorskip("dask_awkward", reason="coffea's dask path needs dask-awkward (not installed)")
    pytest.importorskip("dask_histogram", reason="coffea's dask path needs dask-histogram (not installed)")
    from coffea.nanoevents import NanoAODSchema

    NanoAODSchema.warn_missing_crossrefs = False
    with dask.config.set({"awkward.optimization.which": ["columns"]}):
        yield dak


def test_coffea_nanoevents_dask_same_histograms_as_sync(worker, client, nanoaod_files, dask_awkward):
    import hist.dask as hda
    from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

    dak = dask_awkward
    outputs = []
    for path, n_events in ((nanoaod_files["ttbar"], 40_000), (nanoaod_files["wjets"], 20_000)):
        steps = [[s, min(s + 5000, n_events)] for s in range(0, n_events, 5000)]
        events = NanoEventsFactory.from_root(
            {str(path): {"object_path": "Events", "steps": steps}}, schemaclass=NanoAODSchema, mode="dask"
        ).events()
        jets = events.Jet[(events.Jet.pt > 30) & (abs(events.Jet.eta) < 2.4)]
        ht = hda.Hist.new.Reg(25, 0, 1000, name="ht").Weight().fill(ht=dak.sum(jets.pt, axis=1))
        njet = hda.Hist.new.Reg(10, 0, 10, name="n").Double().fill(n=dak.num(jets, axis=1))
        outputs += [ht, njet, dak.num(events, axis=0)]
    n_partitions = 8 + 4
    expected = dask.compute(*outputs, scheduler="sync")
    mqdask.STATS.clear()
    got = dask.compute(*outputs, scheduler=client.get)
    assert got[2] == 40_000 and got[5] == 20_000
    for g, e in zip(got, expected, strict=True):
        assert g == e
    assert mqdask.STATS["tasks"] <= n_partitions + len(outputs), dict(mqdask.STATS)
    assert mqdask.STATS["dask_tasks"] > 2 * n_partitions


def test_coffea_apply_to_fileset_same_as_sync(worker, client, nanoaod_files, dask_awkward):
    from coffea.dataset_tools import apply_to_fileset, preprocess
    from coffea.nanoevents import NanoAODSchema

    fileset = {name: {"files": {str(path): "Events"}} for name, path in nanoaod_files.items()}
    available, _ = preprocess(fileset, step_size=10_000, scheduler=client.get)
    out = apply_to_fileset(JetPt(), available, schemaclass=NanoAODSchema)
    (expected,) = dask.compute(out, scheduler="sync")
    with client:  # the default dask scheduler inside the block
        (got,) = dask.compute(out)
    assert {k: v["n"] for k, v in got.items()} == {"ttbar": 40_000, "wjets": 20_000}
    for name in fileset:
        assert got[name]["pt"] == expected[name]["pt"]


class JetPt(processor.ProcessorABC):
    """A dask-awkward processor for ``apply_to_fileset`` (module level: it pickles by reference)."""

    def process(self, events):
        import dask_awkward as dak
        import hist.dask as hda

        jets = events.Jet[events.Jet.pt > 30]
        pt = hda.Hist.new.Reg(20, 0, 400, name="pt").Double().fill(pt=dak.flatten(jets.pt))
        return {"pt": pt, "n": dak.num(events, axis=0)}

    def postprocess(self, accumulator):
        return accumulator


class EagerJets(processor.ProcessorABC):
    """A plain (eager) coffea processor for ``processor.Runner``."""

    def process(self, events):
        import awkward as ak
        import hist
        from coffea.nanoevents import NanoAODSchema

        NanoAODSchema.warn_missing_crossrefs = False
        jets = events.Jet[events.Jet.pt > 30]
        h = hist.Hist.new.Reg(20, 0, 400, name="pt").Double().fill(pt=ak.flatten(jets.pt))
        return {"n": len(events), "pt": h, "per_dataset": {events.metadata["dataset"]: len(events)}}

    def postprocess(self, accumulator):
        return accumulator


def test_coffea_dask_executor_on_mqexec_client_same_as_iterative(worker, client, nanoaod_files):
    from coffea.nanoevents import NanoAODSchema

    fileset = {name: {"files": {str(path): "Events"}} for name, path in nanoaod_files.items()}

    def run(executor):
        runner = processor.Runner(executor, schema=NanoAODSchema, chunksize=10_000)
        return runner(fileset, processor_instance=EagerJets(), treename="Events")

    expected = run(processor.IterativeExecutor())
    got = run(processor.DaskExecutor(client=client, status=False))
    assert got["n"] == expected["n"] == 60_000
    assert got["per_dataset"] == expected["per_dataset"] == {"ttbar": 40_000, "wjets": 20_000}
    assert got["pt"] == expected["pt"]
