"""The dask scheduler of mqexec (``client.get``): every graph form, graph fusion, and coffea's dask paths.

Graph fusion is checked by counting: ``mqexec.adapters.dask.STATS["tasks"]`` is the number of mqexec tasks
(broker messages out; as many results come back) that a computation cost, and it must grow like the number
of partitions N, not like the number of dask tasks.
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
processor = pytest.importorskip("coffea.processor")
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
    }
    out = client.get(dsk, ["d", ["a", "b", ["e"]], "f", "g", ("x", 1)])
    assert out == [30, [1, 3, [[1, 2]]], 31, big.sum(), 120]
    assert client.get(dsk, "c") == 30
    assert mqdask.STATS["scattered"] >= 1
    assert dask.compute(dask.delayed(double)(dask.delayed(double)(3)), scheduler=client.get) == (12,)


def test_sync_false_returns_futures_in_the_same_structure(worker, client):
    dsk = {"a": (double, 4), "b": (double, "a"), "k": 7}
    futs = client.get(dsk, ["b", ["a", "k"]], sync=False)
    assert all(isinstance(f, mqexec.Future) for f in [futs[0], *futs[1]])
    assert client.gather(futs) == [16, [8, 7]]


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

    scatter = submit


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
