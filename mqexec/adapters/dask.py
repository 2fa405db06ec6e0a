"""Dask on mqexec: a scheduler ``get`` with graph fusion, ``compute``/``persist``/``futures_of``, and the
default-scheduler switch.

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
  scattered once instead (``Client.scatter``); mqexec futures in the graph (a persisted collection's) are
  handed to the chains that read them as they are.

So N partitions cost O(N) messages: one per partition chain plus one per reduction node (dask's tree
reductions combine ``split_every`` inputs each). :data:`STATS` counts the tasks this module submitted.

Use it like the ``distributed`` scheduler::

    >>> import dask, dask.array as da                                # doctest: +SKIP
    >>> with mqexec.Client("amqp://guest:guest@127.0.0.1:5672//") as client:   # doctest: +SKIP
    ...     dask.compute(da.ones(1000, chunks=100).sum())             # default scheduler inside `with`
    ...     dask.compute(x, scheduler=client.get)                     # or explicitly
    ...     fut = client.compute(x)                                   # a Future of the final value
    (np.float64(1000.0),)

Beyond ``get``, the ``distributed.Client`` methods that take collections: :func:`compute` (futures of final
values; containers of collections are computed as one delayed value), :func:`persist` (the same collections,
their graphs now holding the futures of their partitions) and :func:`futures_of` (the futures inside any of
those, for ``wait``). Two dask settings are honoured as ``distributed`` honours them: ``dask.annotate(retries=n)``
(a chain gets the largest ``retries`` of its tasks), and the dataframe shuffle — grid workers share no disk, so
graphs are built with ``dataframe.shuffle.method="tasks"`` unless the user chose one, and a graph that shuffles
through a local disk (``"disk"``, partd) or through distributed's workers (``"p2p"``) is refused.

A graph with a missing dependency, a cycle or such a shuffle is refused with a :class:`ValueError` naming the
key before anything is sent.

One piece because: the graph plan (cut into chains), the worker-side loop that runs a chain and the client
side that submits chains and repacks values are one algorithm over one data structure; splitting them would
split the invariants of the plan from the code that relies on them.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, ValuesView
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
    Dataframe shuffles built inside are task-based (unless the user chose a method).

    >>> with default_scheduler(client):          # doctest: +SKIP
    ...     dask.compute(x)                       # runs on client's workers
    """
    import dask

    with dask.config.set(scheduler=client.get), _task_shuffle():
        yield


@contextlib.contextmanager
def _task_shuffle() -> Iterator[None]:
    """Dataframe shuffles built inside take the task-based method, unless the user configured one.

    dask picks ``"disk"`` (partd files in a local folder every worker must see) when no ``distributed`` client
    exists; grid workers share no disk.
    """
    import dask

    if dask.config.get("dataframe.shuffle.method", None) is not None:
        yield
        return
    with dask.config.set({"dataframe.shuffle.method": "tasks"}):
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
    retries: dict[Any, int] = field(default_factory=dict)  #: ``dask.annotate(retries=)`` of the keys that have one


def _materialize(dsk: Any) -> tuple[dict[Any, Any], dict[str, dict[Any, Any]]]:
    """Any dask graph (a mapping, a HighLevelGraph, an expression, a collection) as ``{key: GraphNode}``, each
    node under its graph key, and its ``dask.annotate`` values as ``{"retries": {key: value}, ...}``."""
    from dask._task_spec import convert_legacy_graph
    from dask.utils import ensure_dict

    annotations: dict[str, dict[Any, Any]] = {}
    if not isinstance(dsk, Mapping):
        if not hasattr(dsk, "__dask_graph__"):
            raise TypeError(f"not a dask graph: {type(dsk).__name__}")
        if hasattr(dsk, "__dask_annotations__"):  # an expression (dask >= 2025.4) knows its own
            annotations = {name: dict(values) for name, values in dsk.__dask_annotations__().items()}
        dsk = dsk.__dask_graph__()
    for layer in getattr(dsk, "layers", {}).values():  # a HighLevelGraph keeps them per layer
        for name, value in (getattr(layer, "annotations", None) or {}).items():
            annotations.setdefault(name, {}).update({k: value(k) if callable(value) else value for k in layer})
    graph = {k: _keyed(k, node) for k, node in convert_legacy_graph(ensure_dict(dsk)).items()}
    return graph, annotations


def _keyed(key: Any, node: Any) -> Any:
    """``node`` under its graph key: dask builds aliases whose own key is their target's (``df.loc[a:b]``)."""
    from dask._task_spec import Alias

    if node.key == key:
        return node
    if isinstance(node, Alias):
        return Alias(key, node.target)
    return node.substitute({}, key=key)


def _refuse_local_shuffles(graph: dict[Any, Any]) -> None:
    """A shuffle that needs one shared disk or distributed's own workers raises ValueError naming its task."""
    for k, node in graph.items():
        func = getattr(node, "func", None)
        if type(func).__name__ == "maybe_buffered_partd":
            raise ValueError(
                f"dask task {k!r} starts an on-disk shuffle (dataframe.shuffle.method 'disk', partd files), which "
                "needs one disk shared by all workers; build the graph inside `with client:` or under "
                "dask.config.set({'dataframe.shuffle.method': 'tasks'})"
            )
        if (getattr(func, "__module__", None) or "").startswith("distributed.shuffle"):
            raise ValueError(
                f"dask task {k!r} is part of a peer-to-peer shuffle (dataframe.shuffle.method 'p2p'), which runs "
                "only on distributed's workers; use dask.config.set({'dataframe.shuffle.method': 'tasks'})"
            )


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
        ValueError: a requested key or a dependency is not in the graph, the graph has a cycle, or it shuffles
            through a local disk or distributed's workers.
    """
    from dask.sizeof import sizeof

    from ..futures import Future

    wanted = _flat_keys(keys)
    full, annotations = _materialize(dsk)
    graph = _cull(full, wanted)
    order = _toposort(graph)
    _refuse_local_shuffles(graph)
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
    retries = {k: int(n) for k, n in annotations.get("retries", {}).items() if k in graph and n is not None}
    return Plan(graph, chains, chain_of, shared, retries)


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
    retries: int | None = None,
    priority: int = 0,
    resources: dict[str, float] | None = None,
    own_future: set[Any] | frozenset[Any] = frozenset(),
) -> tuple[Plan, dict[Any, Future], dict[Any, Any]]:
    """Submit a graph's chains; returns the plan, a future per chain-exported key, and constant values.

    Keys in ``own_future`` get a future of their value itself (the chain is unwrapped when the key is its
    only export, else a small picking task is added); other keys map to their chain's future (a dict).
    A chain is retried as often as the most of its tasks' ``dask.annotate(retries=)`` allow; tasks without
    one get ``retries``, or else that of a ``dask.annotate`` around this call (as in ``distributed``).
    """
    import dask

    from ..futures import Future

    p = plan(dsk, keys)
    around = retries or dask.get_annotations().get("retries") or 0  # a number, or a function of the key
    wanted = _flat_keys(keys)
    token = uuid.uuid4().hex[:8]
    graph = p.graph
    values: dict[Any, Any] = {}
    for k in p.shared:
        value = graph[k].value
        values[k] = value if isinstance(value, Future) else _scatter(client, value, hash=True)
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
            key=_future_key(exports[0], f"dask-{token}-{i}") if unwrap else f"dask-{token}-{i}",
            pure=False,
            retries=max(p.retries.get(k, around(k) if callable(around) else around) for k in chain.keys),
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
            pick_key = _future_key(k, f"dask-{token}-pick-{len(out)}")
            out[k] = client.submit(_pick, chain_future, k, key=pick_key, pure=False, label=f"pick {k!r}"[:80])
            STATS["tasks"] += 1
    return p, out, constants


def _future_key(dask_key: Any, fallback: str) -> Any:
    """The key of the future of one dask key's value: the dask key itself, as in distributed (the same key
    gives the same future while one is held); ``fallback`` for a key that is neither a string nor a tuple."""
    valid = isinstance(dask_key, str) or (
        isinstance(dask_key, tuple) and all(isinstance(k, str | int | float) for k in dask_key)
    )
    return dask_key if valid else fallback


def _futures_for(client: Client, dsk: Any, keys: Any, **options: Any) -> dict[Any, Future]:
    """Submit a graph; a future of each wanted key's own value (a future found in the graph stands for itself)."""
    from ..futures import Future

    _, futures, constants = _schedule(client, dsk, keys, own_future=set(_flat_keys(keys)), **options)
    for k, v in constants.items():
        futures[k] = v if isinstance(v, Future) else _scatter(client, v, hash=False)
    return futures


def _scatter(client: Client, value: Any, hash: bool) -> Future:
    """One future of ``value`` (``Client.scatter`` scatters a list's or a dict's items one by one)."""
    return client.scatter([value], hash=hash)[0]


def _graph_of(collections: list[Any], optimize_graph: bool, finalize: bool) -> tuple[Any, list[Any]]:
    """One graph for dask collections, and per collection the key of its final value (``finalize``) or the
    keys of its partitions. The graph keeps the collections' ``dask.annotate`` values."""
    try:  # dask >= 2025.4: expressions, with the finalize step in the graph
        from dask._expr import FinalizeCompute  # type: ignore[attr-defined]
        from dask.base import collections_to_expr  # type: ignore[attr-defined]
    except ImportError:  # older dask: a graph plus each collection's __dask_postcompute__
        from dask._task_spec import Task, TaskRef
        from dask.base import collections_to_dsk
        from dask.delayed import single_key
        from dask.highlevelgraph import HighLevelGraph

        graph = collections_to_dsk(collections, optimize_graph)
        keys = [c.__dask_keys__() for c in collections]
        if not finalize:
            return graph, keys
        finals: dict[Any, Any] = {}
        for i, (c, ks) in enumerate(zip(collections, keys, strict=True)):
            func, extra = c.__dask_postcompute__()
            if func is single_key and len(ks) == 1 and not extra:  # a delayed value: its own key, as distributed
                keys[i] = ks[0]
                continue
            keys[i] = f"finalize-{uuid.uuid4().hex}"
            finals[keys[i]] = Task(keys[i], _finalize, func, tuple(extra), ks, *[TaskRef(k) for k in _flat_keys(ks)])
        return HighLevelGraph.merge(graph, finals), keys
    expr = collections_to_expr(collections, optimize_graph)
    expr = (FinalizeCompute(expr) if finalize else expr).optimize()
    keys = expr.__dask_keys__()
    return (expr, _flat_keys(keys)) if finalize else (expr, list(keys))


def collection_graph(collection: Any, optimize_graph: bool = True) -> tuple[Any, Any]:
    """A dask collection as ``(graph, key)``: computing ``key`` gives the collection's final value.

    >>> graph, key = collection_graph(da.ones(10, chunks=5).sum())       # doctest: +SKIP
    >>> get(client, graph, key)                                          # doctest: +SKIP
    np.float64(10.0)
    """
    with _task_shuffle():
        graph, (key,) = _graph_of([collection], optimize_graph, finalize=True)
    return graph, key


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
        retries: extra attempts of a chain whose task raises (``dask.annotate(retries=)`` also counts).
        priority, resources: passed to :meth:`Client.submit`; other keywords (dask passes some) are ignored.

    Raises:
        ValueError: a key or dependency is missing, the graph has a cycle or a shuffle mqexec workers cannot
            run (see :func:`plan`) — before anything is sent.
    """
    options: dict[str, Any] = {"retries": retries, "priority": priority, "resources": resources}
    if not sync:
        return _repack(keys, _futures_for(client, dsk, keys, **options))
    _, futures, constants = _schedule(client, dsk, keys, **options)
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
    traverse: bool = True,
    retries: int | None = None,
    priority: int = 0,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> Any:
    """Submit dask collections; a Future per collection (of its final value), or the values if ``sync``.

    As ``distributed.Client.compute``: a list, tuple or set gives a list with a future per collection in it;
    with ``traverse`` a container (list, tuple, set, dict, iterator) is computed as one ``dask.delayed`` value,
    dask collections inside it included; anything else is returned as it is. All collections go out as one
    graph, so what they share is computed once.

    >>> fut = compute(client, da.ones(100, chunks=10).sum())   # doctest: +SKIP
    >>> fut.result()                                           # doctest: +SKIP
    np.float64(100.0)
    >>> compute(client, {"x": [x], "n": 1}, sync=True)         # doctest: +SKIP
    {'x': [array([...])], 'n': 1}
    """
    import dask

    from ..futures import Future

    single = not isinstance(collections, list | tuple | set | frozenset)
    items = [collections] if single else list(collections)
    if traverse:
        items = [dask.delayed(a) if isinstance(a, list | set | tuple | dict | Iterator) else a for a in items]
    variables = [a for a in items if dask.is_dask_collection(a)]
    finals: Iterator[Future] = iter(())
    if variables:
        with _task_shuffle():
            graph, keys = _graph_of(variables, optimize_graph, finalize=True)
        futures = _futures_for(client, graph, keys, retries=retries, priority=priority, resources=resources)
        finals = iter([futures[k] for k in keys])
    out = [next(finals) if dask.is_dask_collection(a) else a for a in items]
    if sync:
        out = [f.result() if isinstance(f, Future) else f for f in out]
    return out[0] if single else out


def persist(
    client: Client,
    collections: Any,
    *,
    optimize_graph: bool = True,
    retries: int | None = None,
    priority: int = 0,
    resources: dict[str, float] | None = None,
    **kwargs: Any,
) -> Any:
    """Start computing dask collections; the same collections back, their graphs holding the futures of their
    partitions (``Client.persist`` of ``distributed``). A list, tuple or set gives a list.

    Computing a persisted collection (or one built on it) reuses those results instead of recomputing them;
    ``wait(futures_of(xp))`` waits until they are all there.

    >>> xp = persist(client, da.arange(10**6, chunks=10**5) ** 2)      # doctest: +SKIP
    >>> (xp.sum() + xp.max()).compute()                                # doctest: +SKIP

    Raises:
        TypeError: something that is not a dask collection was given.
    """
    import dask

    single = not isinstance(collections, list | tuple | set | frozenset)
    items = [collections] if single else list(collections)
    for c in items:
        if not dask.is_dask_collection(c):
            raise TypeError(f"persist takes dask collections (arrays, dataframes, delayed ...), not {type(c).__name__}")
    with _task_shuffle():  # __dask_postpersist__ lowers a dataframe again: the same shuffle method as the graph
        graph, keys = _graph_of(items, optimize_graph, finalize=False)
        rebuild = [c.__dask_postpersist__() for c in items]
    futures = _futures_for(client, graph, keys, retries=retries, priority=priority, resources=resources)
    out = [
        func({k: futures[k] for k in _flat_keys(ks)}, *extra) for (func, extra), ks in zip(rebuild, keys, strict=True)
    ]
    return out[0] if single else out


def futures_of(obj: Any) -> list[Future]:
    """The mqexec futures inside ``obj``, each key once, in the order found (``distributed.futures_of``).

    ``obj`` may be a future, lists/tuples/sets/dicts (or iterators, ``dict.values()``) of anything, or a dask
    collection: a persisted one holds the futures of its partitions, ``delayed(f)(fut)`` holds ``fut``. It is
    what ``wait`` waits on. An iterator is consumed.

    >>> futures_of([fut, {"a": (fut2, 3)}])          # doctest: +SKIP
    [<Future ...>, <Future ...>]
    >>> wait(futures_of(persist(client, x)))          # doctest: +SKIP
    """
    from ..futures import Future

    dask_imported = "dask" in sys.modules  # otherwise nothing here can be a dask collection or graph node
    found: dict[str, Future] = {}
    seen: dict[int, Any] = {}  # id → object: each container walked once (holding it keeps its id unique)
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, Future):
            found.setdefault(x.key, x)
            continue
        if id(x) in seen:
            continue
        seen[id(x)] = x
        if isinstance(x, list | tuple | set | frozenset | Iterator | ValuesView):
            stack.extend(reversed(list(x)))
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif dask_imported:
            stack.extend(reversed(_dask_parts(x)))
    return list(found.values())


def _dask_parts(x: Any) -> list[Any]:
    """What a dask collection or graph node holds: its graph's nodes, a task's arguments, a data node's value."""
    import dask
    from dask._task_spec import GraphNode

    if dask.is_dask_collection(x):
        return list(x.__dask_graph__().values())
    if isinstance(x, GraphNode):
        return [*getattr(x, "args", ()), *getattr(x, "kwargs", {}).values(), getattr(x, "value", None)]
    return []
