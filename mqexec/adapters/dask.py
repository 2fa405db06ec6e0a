"""Dask on mqexec: a scheduler ``get`` with graph fusion, ``compute``, and the default-scheduler switch.

One broker round trip per dask task would drown a dask-awkward graph (thousands of tiny tasks), and every
intermediate array would travel worker → broker → client → broker → worker. So the graph is cut into
*chains* — pieces that run on one worker without needing any other piece — and each chain goes out as ONE
mqexec task that runs its tasks with a small local loop (:func:`run_subgraph`). Only the values that another
chain (a reduction) or the caller needs come back::

    dask graph (keys (name, i) per partition)            mqexec tasks
    ┌ read 0 → select 0 → fill 0 ┐                  chain 0 ─┐   one message each; returns only fill 0
    │ read 1 → select 1 → fill 1 ├─▶ combine ─▶ fin   chain 1 ─┼─▶ chain "combine+fin" (takes the chain
    └ read 2 → select 2 → fill 2 ┘                  chain 2 ─┘   futures as arguments) ─▶ client

How the cut is made, in topological order:

* a task whose dependencies all lie in one chain joins that chain (a partition's diamond: one read feeding
  several selections stays together, so the read array never leaves the worker) — unless one of those
  dependencies fans out to *different* output partitions (keys ``(name, i)`` with different ``i``, or
  different plain keys): then it starts a chain of its own (a broadcast, e.g. ``x / x.max()``, keeps its
  parallelism);
* a task whose dependencies lie in several chains (a reduction, or a zip with a broadcast value) starts a
  new chain that takes those chains' futures as arguments; the client hands their values in when they are
  done;
* plain data (``DataNode``, legacy literals) is copied into every chain that reads it; data over 64 KiB is
  scattered once instead (``Client.scatter``), as are mqexec futures found in the graph.

So N partitions cost O(N) messages: one per partition chain plus one per reduction node (dask's tree
reductions combine ``split_every`` inputs each). :data:`STATS` counts the tasks this module submitted.

Use it like the ``distributed`` scheduler::

    >>> import dask, dask.array as da                                # doctest: +SKIP
    >>> with mqexec.Client("amqp://guest:guest@127.0.0.1:5672//") as client:   # doctest: +SKIP
    ...     dask.compute(da.ones(1000, chunks=100).sum())             # default scheduler inside `with`
    ...     dask.compute(x, scheduler=client.get)                     # or explicitly
    ...     fut = client.compute(x)                                   # a Future of the final value
    (np.float64(1000.0),)

A graph with a missing dependency or a cycle is refused with a :class:`ValueError` naming the key before
anything is sent.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..client import Client
    from ..futures import Future

#: Counts of what :func:`get`/:func:`compute` sent: ``graphs`` computed, ``dask_tasks`` in them (after
#: culling), ``tasks`` mqexec tasks submitted (chains + result pickers), ``scattered`` constants shipped
#: once. Reset it with ``STATS.clear()``.
STATS: Counter[str] = Counter()

_SCATTER_ABOVE = 64 * 1024  #: constants in the graph bigger than this are scattered once, not copied


@contextlib.contextmanager
def default_scheduler(client: Client) -> Iterator[None]:
    """Make ``client.get`` dask's default scheduler inside the block; the previous one comes back after.

    >>> with default_scheduler(client):          # doctest: +SKIP
    ...     dask.compute(x)                       # runs on client's workers
    """
    import dask

    with dask.config.set(scheduler=client.get):
        yield


# -- the plan ---------------------------------------------------------------------------------------------


@dataclass
class Chain:
    """One mqexec task: dask tasks that run together on a worker.

    Attributes:
        name: a readable id (the first task's key).
        keys: its dask tasks, in the order they run.
        upstream: indices of the chains whose outputs it reads.
        constants: keys of the plain-data nodes copied into it.
        exports: keys whose values leave the worker (read by another chain, or asked for by the caller).
    """

    name: str
    keys: list[Any] = field(default_factory=list)
    upstream: set[int] = field(default_factory=set)
    constants: set[Any] = field(default_factory=set)
    exports: set[Any] = field(default_factory=set)


@dataclass
class Plan:
    """How a graph is cut: ``chains`` in an order where each comes after its upstream chains.

    >>> p = plan({"a": 1, "b": (inc, "a"), "c": (inc, "b")}, ["c"])      # doctest: +SKIP
    >>> [c.keys for c in p.chains]                                        # doctest: +SKIP
    [['b', 'c']]
    """

    graph: dict[Any, Any]  #: key → dask GraphNode (culled to what the keys need)
    chains: list[Chain]
    chain_of: dict[Any, int]  #: task key → index of its chain (constants and shared values have none)
    shared: set[Any]  #: keys of values passed as futures (big constants, futures found in the graph)


def _as_graph(dsk: Any) -> dict[Any, Any]:
    """Any dask graph (a mapping, a HighLevelGraph, an expression) as ``{key: GraphNode}``."""
    from dask._task_spec import convert_legacy_graph
    from dask.utils import ensure_dict

    if not isinstance(dsk, Mapping):
        if not hasattr(dsk, "__dask_graph__"):
            raise TypeError(f"not a dask graph: {type(dsk).__name__}")
        dsk = dsk.__dask_graph__()
    return convert_legacy_graph(ensure_dict(dsk))


def _flat_keys(keys: Any) -> list[Any]:
    if isinstance(keys, list):
        return [k for sub in keys for k in _flat_keys(sub)]
    return [keys]


def _repack(keys: Any, values: dict[Any, Any]) -> Any:
    if isinstance(keys, list):
        return [_repack(k, values) for k in keys]
    return values[keys]


def _cull(graph: dict[Any, Any], wanted: list[Any]) -> dict[Any, Any]:
    """The part of ``graph`` the wanted keys need; a missing key or dependency raises ValueError naming it."""
    for k in wanted:
        if k not in graph:
            raise ValueError(f"key {k!r} was asked for but is not in the dask graph")
    needed: dict[Any, Any] = {}
    stack = list(wanted)
    while stack:
        k = stack.pop()
        if k in needed:
            continue
        node = needed[k] = graph[k]
        for dep in node.dependencies:
            if dep not in graph:
                raise ValueError(f"dask task {k!r} depends on {dep!r}, which is not in the graph")
            stack.append(dep)
    return needed


def _toposort(graph: dict[Any, Any]) -> list[Any]:
    """Keys with dependencies first (stable: graph order otherwise); a cycle raises ValueError naming it."""
    remaining = {k: len(node.dependencies) for k, node in graph.items()}
    dependents: dict[Any, list[Any]] = {k: [] for k in graph}
    for k, node in graph.items():
        for dep in node.dependencies:
            dependents[dep].append(k)
    ready = [k for k, n in remaining.items() if n == 0]
    order: list[Any] = []
    while ready:
        k = ready.pop()
        order.append(k)
        for d in dependents[k]:
            remaining[d] -= 1
            if remaining[d] == 0:
                ready.append(d)
    if len(order) < len(graph):
        raise ValueError(f"the dask graph has a dependency cycle: {' -> '.join(map(repr, _a_cycle(graph, remaining)))}")
    return order


def _a_cycle(graph: dict[Any, Any], remaining: dict[Any, int]) -> list[Any]:
    """One cycle among the keys Kahn's algorithm could not order (each of them has an unordered dependency)."""
    stuck = {k for k, n in remaining.items() if n > 0}
    k = next(iter(stuck))
    path: list[Any] = []
    seen: dict[Any, int] = {}
    while k not in seen:
        seen[k] = len(path)
        path.append(k)
        k = next(d for d in graph[k].dependencies if d in stuck)
    return [*path[seen[k] :], k]


def _partition(key: Any) -> Any:
    """Which output partition a key stands for: ``(name, i, ...)`` → ``(i, ...)``; other keys → themselves."""
    return key[1:] if isinstance(key, tuple) and key else key


def _is_constant(node: Any) -> bool:
    from dask._task_spec import DataNode

    return isinstance(node, DataNode) and not node.dependencies


def plan(dsk: Any, keys: Any, max_fanin: int = 64) -> Plan:
    """Cut a dask graph into chains (see the module docstring); validates it first.

    A reduction swallows the reduction chains it alone consumes (the upper levels of a tree reduction run
    as one chain) as long as the merged chain reads at most ``max_fanin`` other chains.

    >>> p = plan(x.__dask_graph__(), x.__dask_keys__())     # doctest: +SKIP
    >>> len(p.chains), sum(len(c.keys) for c in p.chains)     # doctest: +SKIP
    (17, 57)

    Raises:
        ValueError: a requested key or a dependency is not in the graph, or the graph has a cycle.
    """
    from dask.sizeof import sizeof

    from ..futures import Future

    wanted = _flat_keys(keys)
    graph = _cull(_as_graph(dsk), wanted)
    order = _toposort(graph)
    dependents: dict[Any, list[Any]] = {k: [] for k in graph}
    for k, node in graph.items():
        for dep in node.dependencies:
            dependents[dep].append(k)
    shared: set[Any] = set()
    constants: set[Any] = set()
    for k, node in graph.items():
        if _is_constant(node):
            constants.add(k)
            if isinstance(node.value, Future) or sizeof(node.value) > _SCATTER_ABOVE:
                shared.add(k)
    broadcast = {k for k, ds in dependents.items() if k not in constants and len({_partition(d) for d in ds}) > 1}

    # 1. which chain each task joins (ids in creation order, so a chain's upstream ids are smaller)
    chain_of: dict[Any, int] = {}
    members: dict[int, list[Any]] = {}
    upstream_of: dict[int, set[int]] = {}
    mergeable: set[int] = set()  # chains that a reduction consuming them may swallow
    ids = iter(range(len(graph)))
    for k in order:
        if k in constants:  # copied into the chains that read it, or handed back by the client
            continue
        deps = graph[k].dependencies
        upstream = {chain_of[d] for d in deps if d in chain_of}
        if len(upstream) == 1 and not (deps & broadcast):
            index = upstream.pop()
        else:
            index = next(ids)
            members[index], upstream_of[index] = [], set(upstream)
            if len(upstream) > 1 and not (deps & broadcast):
                index = _swallow(index, k, upstream, members, upstream_of, mergeable, chain_of, dependents, max_fanin)
        members[index].append(k)
        chain_of[k] = index
    # 2. the chains, numbered afresh in creation order, with what crosses their borders
    renumber = {old: new for new, old in enumerate(sorted(members))}
    chain_of = {k: renumber[i] for k, i in chain_of.items()}
    chains = [Chain(name=str(members[old][0]), keys=members[old]) for old in sorted(members)]
    for index, chain in enumerate(chains):
        for k in chain.keys:
            for d in graph[k].dependencies:
                if d in chain_of and chain_of[d] != index:
                    chain.upstream.add(chain_of[d])
                    chains[chain_of[d]].exports.add(d)
                elif d in constants and d not in shared:
                    chain.constants.add(d)
    for k in wanted:
        if k in chain_of:
            chains[chain_of[k]].exports.add(k)
    return Plan(graph, chains, chain_of, shared)


def _swallow(
    index: int,
    key: Any,
    upstream: set[int],
    members: dict[int, list[Any]],
    upstream_of: dict[int, set[int]],
    mergeable: set[int],
    chain_of: dict[Any, int],
    dependents: dict[Any, list[Any]],
    max_fanin: int,
) -> int:
    """Start reduction chain ``index`` for ``key``, merging in the upstream reduction chains that only it reads.

    Returns ``index``; the merged chains' tasks move into it (in their order) and their ids disappear.
    """
    merged: list[int] = []
    inputs: set[int] = set()
    for u in sorted(upstream):
        only_here = all(d == key or chain_of.get(d) == u for k in members[u] for d in dependents[k])
        if u in mergeable and only_here and len(inputs | upstream_of[u]) + len(upstream) <= max_fanin + 1:
            merged.append(u)
            inputs |= upstream_of[u]
    inputs |= upstream - set(merged)
    for u in merged:
        for k in members.pop(u):
            members[index].append(k)
            chain_of[k] = index
        upstream_of.pop(u)
        mergeable.discard(u)
    upstream_of[index] = inputs
    if len(inputs) <= max_fanin:
        mergeable.add(index)
    return index


# -- on the worker ----------------------------------------------------------------------------------------


def run_subgraph(
    nodes: list[Any], exports: list[Any], inputs: list[dict[Any, Any]], values: dict[Any, Any], unwrap: bool = False
) -> Any:
    """Run one chain on a worker: dask ``GraphNode`` s in the given (topological) order.

    Values of other chains' tasks arrive in ``inputs`` (one dict per upstream chain), shared values
    (scattered constants, futures) in ``values``. Returns ``{key: value}`` for the exported keys — or the
    one exported value itself if ``unwrap``. Intermediate values are dropped as soon as nothing needs them.

    >>> from dask._task_spec import Task, TaskRef
    >>> run_subgraph([Task("b", abs, TaskRef("a"))], ["b"], [{"a": -2}], {})
    {'b': 2}
    """
    cache: dict[Any, Any] = dict(values)
    for upstream in inputs:
        cache.update(upstream)
    uses: Counter[Any] = Counter()
    for node in nodes:
        uses.update(node.dependencies)
    keep = set(exports)
    for node in nodes:
        cache[node.key] = node(cache)
        for dep in node.dependencies:
            uses[dep] -= 1
            if uses[dep] == 0 and dep not in keep:
                cache.pop(dep, None)
    if unwrap:
        return cache[exports[0]]
    return {k: cache[k] for k in exports}


def _value(obj: Any) -> Any:
    """A constant asked for by the caller: a future found in the graph stands for its result."""
    from ..futures import Future

    return obj.result() if isinstance(obj, Future) else obj


def _pick(outputs: dict[Any, Any], key: Any) -> Any:
    """The value of one key out of a chain's outputs (used when a caller wants a future per key)."""
    return outputs[key]


# -- on the client ----------------------------------------------------------------------------------------


def _schedule(
    client: Client,
    dsk: Any,
    keys: Any,
    *,
    retries: int = 0,
    priority: int = 0,
    resources: dict[str, float] | None = None,
    own_future: set[Any] = frozenset(),
) -> tuple[Plan, dict[Any, Future], dict[Any, Any]]:
    """Submit a graph's chains; returns the plan, a future per chain-exported key, and constant values.

    Keys in ``own_future`` get a future of their value itself (the chain is unwrapped when the key is its
    only export, else a small picking task is added); other keys map to their chain's future (a dict).
    """
    from ..futures import Future

    p = plan(dsk, keys)
    wanted = _flat_keys(keys)
    token = uuid.uuid4().hex[:8]
    graph = p.graph
    values: dict[Any, Any] = {}
    for k in p.shared:
        value = graph[k].value
        values[k] = value if isinstance(value, Future) else client.scatter(value, hash=True)
        STATS["scattered"] += not isinstance(value, Future)
    consumers: Counter[int] = Counter(u for c in p.chains for u in c.upstream)
    futures: list[Future] = []
    for i, chain in enumerate(p.chains):
        nodes = [graph[k] for k in sorted(chain.constants, key=str)] + [graph[k] for k in chain.keys]
        exports = sorted(chain.exports, key=str)
        needs = {d for k in chain.keys for d in graph[k].dependencies if d in p.shared}
        unwrap = len(exports) == 1 and exports[0] in own_future and not consumers[i]
        first = chain.keys[0]
        label = f"dask {first!r}" + (f" +{len(chain.keys) - 1} tasks" if len(chain.keys) > 1 else "")
        fut = client.submit(
            run_subgraph,
            nodes,
            exports,
            [futures[u] for u in sorted(chain.upstream)],
            {k: values[k] for k in needs},
            unwrap,
            key=f"dask-{token}-{i}",
            pure=False,
            retries=retries,
            priority=priority,
            resources=resources,
            label=label[:80],
        )
        futures.append(fut)
        STATS["tasks"] += 1
    STATS["graphs"] += 1
    STATS["dask_tasks"] += len(graph)
    out: dict[Any, Future] = {}
    constants = {k: graph[k].value for k in wanted if k not in p.chain_of}
    for k in wanted:
        if k not in p.chain_of:
            continue
        index = p.chain_of[k]
        chain_future = futures[index]
        if k not in own_future or (p.chains[index].exports == {k} and not consumers[index]):
            out[k] = chain_future
        else:
            out[k] = client.submit(
                _pick, chain_future, k, key=f"dask-{token}-pick-{len(out)}", pure=False, label=f"pick {k!r}"[:80]
            )
            STATS["tasks"] += 1
    return p, out, constants


def collection_graph(collection: Any, optimize_graph: bool = True) -> tuple[Any, Any]:
    """A dask collection as ``(graph, key)``: computing ``key`` gives the collection's final value.

    >>> graph, key = collection_graph(da.ones(10, chunks=5).sum())       # doctest: +SKIP
    >>> get(client, graph, key)                                          # doctest: +SKIP
    np.float64(10.0)
    """
    try:  # dask >= 2025.4: expressions, with the finalize step in the graph
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr
    except ImportError:  # older dask: a graph plus the collection's __dask_postcompute__
        from dask._task_spec import Task, TaskRef
        from dask.base import collections_to_dsk

        graph = dict(collections_to_dsk([collection], optimize_graph))
        keys = collection.__dask_keys__()
        func, extra = collection.__dask_postcompute__()
        final = f"finalize-{uuid.uuid4().hex}"
        graph[final] = Task(final, _finalize, func, tuple(extra), keys, *[TaskRef(k) for k in _flat_keys(keys)])
        return graph, final
    expr = FinalizeCompute(collections_to_expr([collection], optimize_graph)).optimize()
    (key,) = _flat_keys(expr.__dask_keys__())
    return expr, key


def _finalize(func: Any, extra: tuple[Any, ...], keys: Any, *values: Any) -> Any:
    """``func(results in the structure of keys, *extra)``, from the flat values of the keys."""
    return func(_repack(keys, dict(zip(_flat_keys(keys), values, strict=True))), *extra)


def get(
    client: Client,
    dsk: Any,
    keys: Any,
    *,
    sync: bool = True,
    retries: int | None = None,
    priority: int = 0,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> Any:
    """Compute a dask graph on mqexec workers: a dask scheduler, ``dask.compute(x, scheduler=client.get)``.

    Takes every graph dask produces (a mapping of ``Task``/``DataNode``/``Alias``/legacy tuples, a
    HighLevelGraph, or the expression ``dask.compute`` hands to schedulers); ``keys`` may be nested lists
    and the values come back in the same structure.

    >>> get(client, {"a": 1, "b": (operator.add, "a", 2)}, ["b", ["a"]])     # doctest: +SKIP
    [3, [1]]

    Args:
        sync: False returns futures (in the structure of ``keys``) instead of values.
        retries: extra attempts of a chain whose task raises.
        priority, resources: passed to :meth:`Client.submit`; other keywords (dask passes some) are ignored.

    Raises:
        ValueError: a key or dependency is missing, or the graph has a cycle — before anything is sent.
    """
    if not sync:
        _, futures, constants = _schedule(
            client,
            dsk,
            keys,
            retries=retries or 0,
            priority=priority,
            resources=resources,
            own_future=set(_flat_keys(keys)),
        )
        for k, v in constants.items():
            futures[k] = client.scatter(_value(v), hash=False)
        return _repack(keys, futures)
    _, futures, constants = _schedule(client, dsk, keys, retries=retries or 0, priority=priority, resources=resources)
    values = {k: _value(v) for k, v in constants.items()}
    for k, fut in futures.items():
        result = fut.result()
        values[k] = result[k]
    return _repack(keys, values)


def compute(
    client: Client,
    collections: Any,
    sync: bool = False,
    *,
    optimize_graph: bool = True,
    retries: int | None = None,
    priority: int = 0,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> Any:
    """Submit dask collections; a Future per collection (of its final value), or the values if ``sync``.

    Like ``distributed.Client.compute``: a list or tuple of collections gives a list of futures; anything
    that is not a dask collection is returned as it is.

    >>> fut = compute(client, da.ones(100, chunks=10).sum())   # doctest: +SKIP
    >>> fut.result()                                           # doctest: +SKIP
    np.float64(100.0)
    """
    from dask.base import is_dask_collection

    from ..futures import Future

    single = not isinstance(collections, list | tuple)
    items = [collections] if single else list(collections)
    out: list[Any] = []
    for c in items:
        if not is_dask_collection(c):
            out.append(c)
            continue
        graph, key = collection_graph(c, optimize_graph)
        _, futures, constants = _schedule(
            client, graph, [key], own_future={key}, retries=retries or 0, priority=priority, resources=resources
        )
        out.append(futures[key] if key in futures else client.scatter(_value(constants[key]), hash=False))
    if sync:
        out = [f.result() if isinstance(f, Future) else f for f in out]
    return out[0] if single else out
