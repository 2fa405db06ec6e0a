"""The dask graph plan without a broker: chains, fusion of reductions, broadcasts, constants, and refused graphs.

Every plan is also *run* here, chain by chain with :func:`run_subgraph` (what the workers run), handing each chain
only its upstream chains' exports (what the client hands on): the values must equal dask's own synchronous ones.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

from dask._task_spec import Task, TaskRef  # noqa: E402

from mqexec.adapters.dask import Plan, collection_graph, plan, run_subgraph  # noqa: E402


def inc(x: int) -> int:
    return x + 1


def total(*parts: Any) -> Any:
    return sum(parts)


def _run(p: Plan, keys: list[Any]) -> dict[Any, Any]:
    """The values of ``keys``, computed the way mqexec does it: one run_subgraph per chain."""
    outputs: list[dict[Any, Any]] = []
    for index, chain in enumerate(p.chains):
        assert all(u < index for u in chain.upstream), "a chain comes after the chains it reads"
        nodes = [p.graph[k] for k in sorted(chain.constants, key=str)] + [p.graph[k] for k in chain.keys]
        inputs = [outputs[u] for u in sorted(chain.upstream)]
        shared = {k: p.graph[k].value for k in p.shared}
        outputs.append(run_subgraph(nodes, sorted(chain.exports, key=str), inputs, shared))
    return {k: outputs[p.chain_of[k]][k] if k in p.chain_of else p.graph[k].value for k in keys}


def _check(p: Plan) -> None:
    """Each task is in exactly one chain; what a chain exports is read by another chain or wanted."""
    keys = [k for c in p.chains for k in c.keys]
    assert len(keys) == len(set(keys)) == len(p.chain_of)
    for index, chain in enumerate(p.chains):
        for k in chain.keys:
            assert p.chain_of[k] == index


def test_a_chain_runs_as_one_task_with_its_constant_copied_in() -> None:
    """The example of Plan's docstring."""
    p = plan({"a": 1, "b": (inc, "a"), "c": (inc, "b")}, ["c"])
    assert [c.keys for c in p.chains] == [["b", "c"]]
    assert (p.chains[0].constants, p.chains[0].exports, p.shared) == ({"a"}, {"c"}, set())
    assert _run(p, ["c"]) == {"c": 3}


def test_only_what_the_keys_need_is_planned() -> None:
    dsk = {"a": 1, "b": (inc, "a"), "unused": (inc, "b"), "other": (inc, 5)}
    p = plan(dsk, ["b"])
    assert set(p.graph) == {"a", "b"} and [c.keys for c in p.chains] == [["b"]]


def test_nested_key_lists_and_a_wanted_constant() -> None:
    dsk = {"a": 1, ("x", 0): (inc, "a"), ("x", 1): (inc, ("x", 0))}
    p = plan(dsk, [[("x", 0), ("x", 1)], ["a"]])
    assert len(p.chains) == 1 and p.chains[0].exports == {("x", 0), ("x", 1)}
    assert _run(p, [("x", 0), ("x", 1), "a"]) == {("x", 0): 2, ("x", 1): 3, "a": 1}


def test_partitions_become_chains_and_a_tree_reduction_one_chain() -> None:
    n = 16
    x = da.arange(n * 10, chunks=10)
    s = (x + 1).sum(split_every=4)
    graph, key = collection_graph(s)
    p = plan(graph, [key])
    _check(p)
    assert len(p.chains) == n + 1  # one per partition, and the whole reduction tree (5 sums + finalize) as one
    partition_chains, reduction = p.chains[:n], p.chains[n]
    assert all(not c.upstream and len(c.exports) == 1 for c in partition_chains)
    assert reduction.upstream == set(range(n)) and reduction.exports == {key}
    assert _run(p, [key])[key] == s.compute(scheduler="sync")


def test_a_reduction_reads_at_most_max_fanin_chains() -> None:
    n = 16
    s = (da.arange(n * 10, chunks=10) * 2).sum(split_every=4)
    graph, key = collection_graph(s)
    p = plan(graph, [key], max_fanin=4)
    _check(p)
    assert len(p.chains) > n + 1 and all(len(c.upstream) <= 4 for c in p.chains)
    assert _run(p, [key])[key] == s.compute(scheduler="sync")


def test_a_broadcast_keeps_its_partitions_apart() -> None:
    n = 8
    x = da.arange(n * 10, chunks=10)
    y = x / x.max()  # every partition reads the global max
    graph, key = collection_graph(y)
    p = plan(graph, [key])
    _check(p)
    for chain in p.chains:  # no chain holds two partitions of the normalised array
        partitions = {k[1:] for k in chain.keys if isinstance(k, tuple) and k[0].startswith("truediv")}
        assert len(partitions) <= 1
    assert len(p.chains) >= 2 * n
    np.testing.assert_allclose(_run(p, [key])[key], y.compute(scheduler="sync"))


def test_a_partition_diamond_stays_on_one_worker() -> None:
    dsk: dict[Any, Any] = {}
    for i in range(4):
        dsk[("read", i)] = (np.arange, 10 * i, 10 * i + 10)
        dsk[("even", i)] = (operator.getitem, ("read", i), slice(0, None, 2))
        dsk[("odd", i)] = (operator.getitem, ("read", i), slice(1, None, 2))
        dsk[("fill", i)] = (operator.add, ("even", i), ("odd", i))
    dsk["sum"] = (total, *[(np.sum, ("fill", i)) for i in range(4)])
    p = plan(dsk, ["sum"])
    _check(p)
    assert [len(c.keys) for c in p.chains] == [4, 4, 4, 4, 1]
    for chain in p.chains[:4]:  # a partition's read array stays on its worker; only its fill leaves
        (i,) = {k[1] for k in chain.keys}
        assert chain.exports == {("fill", i)}
    assert _run(p, ["sum"])["sum"] == sum(range(40))


def test_a_big_constant_is_shared_not_copied() -> None:
    big = np.ones(100_000)  # 800 kB: scattered once instead of copied into every chain
    dsk = {"big": big, "small": 2, ("y", 0): (operator.mul, "big", "small"), ("y", 1): (operator.add, "big", "small")}
    dsk["out"] = (total, (np.sum, ("y", 0)), (np.sum, ("y", 1)))
    p = plan(dsk, ["out"])
    assert p.shared == {"big"}
    assert all("big" not in c.constants for c in p.chains)
    assert any("small" in c.constants for c in p.chains)
    assert _run(p, ["out"])["out"] == 100_000 * 2 + 100_000 * 3


def test_retries_annotations_are_kept_per_key() -> None:
    with dask.annotate(retries=2):
        a = dask.delayed(inc, pure=False)(1) + 0
    b = dask.delayed(inc, pure=False)(a)
    graph, key = collection_graph(b)
    p = plan(graph, [key])
    assert sorted(p.retries.values()) == [2, 2] and key not in p.retries


@pytest.mark.parametrize(
    "dsk, keys, message",
    [
        ({"a": 1}, ["nope"], "key 'nope' was asked for but is not in the dask graph"),
        ({"a": Task("a", inc, TaskRef("missing"))}, ["a"], "dask task 'a' depends on 'missing', which is not in"),
        (
            {"a": (inc, "b"), "b": (inc, "a")},
            ["a"],
            "the dask graph has a dependency cycle: '[ab]' -> '[ab]' -> '[ab]'",
        ),
        (
            {("p", 0): (operator.neg, ("p", 1)), ("p", 1): (operator.neg, ("p", 0)), "out": (inc, ("p", 0))},
            ["out"],
            r"dependency cycle: \('p', [01]\) -> \('p', [01]\) -> \('p', [01]\)",
        ),
    ],
)
def test_a_bad_graph_is_a_value_error_naming_the_key(dsk: dict[Any, Any], keys: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(dsk, keys)


def test_what_is_not_a_graph_is_refused() -> None:
    with pytest.raises(TypeError, match="not a dask graph: int"):
        plan(3, ["a"])
