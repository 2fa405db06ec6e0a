"""Caching by content in the data lake: keys from the code, the data and the environment.

    client:  identity(processor or function) ──┐
             the item / the arguments ─────────┴─▶ (namespace, key)
             Cache.lookup(namespace, keys) ── one listing per namespace and lake ──▶ hits ──Cache.load──▶ values
                                                                                   misses ──▶ tasks
    worker:  Memoized / coffea's cached task ── compute ──▶ Cache.store (own lake, atomic) ──▶ result

**Identity.** ``identity(obj)`` hashes (sha256) what decides what ``obj`` computes:

- its pickle (cloudpickle; sets in plain containers sorted, cloudpickle's random class-tracking ids masked),
  which holds the instance's state and the code of everything pickled *by value* (``__main__``, notebooks,
  modules registered with ``cloudpickle.register_pickle_by_value``);
- the source files of the modules the pickle refers to *by reference* that are the user's own (not in the
  standard library nor in site-packages), and of the user's modules those import — editing a class that is
  pickled by reference, or a helper it calls, changes the identity;
- the versions of the installed distributions it refers to, and of Python.

A record is never used for other code or data, only ever missed: something that pickles differently on every
run (e.g. a set of strings inside an object) costs a rerun, never a wrong result.

**Sharing.** ``Cache(["root://eos//me/cache", "root://eos//colleague/cache"])`` reads from every lake in
order and writes only to the first::

    >>> cache = Cache("/tmp/mqexec-cache")
    >>> ns, key = memo_key(len, ("abc",), {})
    >>> cache.lookup(ns, [key])                             # {} → a miss: run it
    {}

One piece because: the cache's keys (code, data, environment), its records and its lookups must change
together — a key computed one way and looked up another would serve a stale result.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import pickle
import sys
import sysconfig
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UnsafeResultError
from .lake import Lake, LakeError, cache_key, open_lake
from .safepickle import loads as safe_loads

__all__ = ["Cache", "MemoPlan", "Memoized", "args_key", "identity", "memo_key"]

log = logging.getLogger("mqexec.cache")

_DOWN_FOR = 60.0  #: seconds a lake that was unreachable is not tried again by this process
ABOUT = "_about"  #: the record in every namespace that says what made it (read by ``mqexec cache ls``)
_MAX_DEPTH = 8  #: how deep the hash looks into plain containers and instance dicts for sets to sort


# ------------------------------------------------------------------------------------------------ identity
def _code_fields(code: types.CodeType) -> tuple[Any, ...]:
    """A code object for hashing: its constant frozensets (set literals) sorted, no file name or line numbers."""
    consts = tuple(("<set>", *sorted(map(repr, c))) if type(c) is frozenset else c for c in code.co_consts)
    return (code.co_code, consts, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars,
            code.co_qualname, code.co_argcount, code.co_kwonlyargcount, code.co_flags)  # fmt: skip


class _HashPickler:
    """cloudpickle that also notes the module of every class, function and module it meets."""

    def __init__(self) -> None:
        import cloudpickle

        modules: set[str] = set()

        class Pickler(cloudpickle.Pickler):
            def reducer_override(self, obj: Any) -> Any:
                if isinstance(obj, types.CodeType):  # what the code does, not where it sits in its file
                    return types.CodeType, _code_fields(obj)
                if isinstance(obj, types.ModuleType):
                    modules.add(obj.__name__)
                elif isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
                    modules.add(getattr(obj, "__module__", None) or "builtins")
                return super().reducer_override(obj)

        self.modules = modules
        self._pickler = Pickler

    def dumps(self, obj: Any) -> bytes:
        """The pickle of ``obj`` as a stable byte string (see :func:`_unshared`)."""
        buf = io.BytesIO()
        self._pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
        return _unshared(_replace_trackers(buf.getvalue(), lambda: "0" * 32))


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_MEMO_PUT = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def _unshared(data: bytes) -> bytes:
    """The pickle's opcodes with every memo reference to a string replaced by the string itself.

    Whether a name is written out or fetched from the memo depends on whether two equal strings are the
    same object — which changes, e.g., once a class pickled by value has been unpickled in this process. The
    hash must not."""
    import pickletools

    out = io.BytesIO()
    memo: dict[int, tuple[str, Any]] = {}
    last: tuple[str, Any] = ("", None)
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name == "FRAME":
            continue
        if name in _MEMO_PUT:
            index = len(memo) if name == "MEMOIZE" else int(arg or 0)
            memo[index] = last if last[0] == "str" else ("obj", sum(v[0] == "obj" for v in memo.values()))
            continue
        last = (
            memo.get(int(arg or 0), ("?", arg))
            if name in _MEMO_GET
            else ("str", arg)
            if name in _STRINGS
            else (name, arg)
        )
        out.write(repr(last).encode() + b"\n")
    return out.getvalue()


def _replace_trackers(data: bytes, new: Callable[[], str]) -> bytes:
    """``data`` with cloudpickle's class-tracking ids (a random uuid per class and process) replaced."""
    from cloudpickle import cloudpickle as impl

    for tracker in list(getattr(impl, "_DYNAMIC_CLASS_TRACKER_BY_CLASS", {}).values()):
        data = data.replace(tracker.encode(), new().encode())
    return data


def loads_detached(data: bytes) -> Any:
    """Unpickle cloudpickle ``data`` made in this process without touching the classes it pickled by value.

    cloudpickle would hand back the original class and reset its attributes from ``data`` (a side effect that
    changes how the class pickles next time); with its tracking ids renewed, the classes are built anew."""
    import uuid

    import cloudpickle

    return cloudpickle.loads(_replace_trackers(data, lambda: uuid.uuid4().hex))


def _canonical(obj: Any, pickler: _HashPickler, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """``obj`` with sets and dicts made sorted tuples, looking into containers and instance dicts (hashing only)."""
    if depth > _MAX_DEPTH or id(obj) in seen:
        return obj
    seen = seen | {id(obj)}

    def canon(x: Any) -> Any:
        return _canonical(x, pickler, depth + 1, seen)

    kind = type(obj)
    if kind in (set, frozenset):
        return ("<set>", tuple(sorted((canon(x) for x in obj), key=pickler.dumps)))
    if kind in (list, tuple):
        return kind(canon(x) for x in obj)
    if kind is dict:  # equal dicts hash alike, whatever order their keys were inserted in
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        return ("<dict>", tuple((canon(k), canon(v)) for k, v in items))
    if isinstance(obj, type | types.FunctionType | types.ModuleType | types.BuiltinFunctionType):
        return obj
    if type(obj).__reduce_ex__ is object.__reduce_ex__ and hasattr(obj, "__dict__"):
        state = obj.__getstate__()  # what pickling keeps (a class may leave attributes out)
        if type(state) is dict:
            return ("<object>", kind, canon(state))
    return obj


@functools.lru_cache(maxsize=1)
def _environment_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= {sys.base_prefix, sys.prefix}
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


@functools.lru_cache(maxsize=1)
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _by_value(name: str) -> bool:
    import cloudpickle

    registered = cloudpickle.list_registry_pickle_by_value()
    return name == "__main__" or any(name == m or name.startswith(m + ".") for m in registered)


def _origin(name: str) -> str | None:
    """The file a module is (or would be) loaded from, without running it; None if there is none."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    return spec.origin if spec is not None and spec.has_location else None


def _imports(source: bytes, name: str, path: str) -> set[str]:
    """The modules a module's source imports (anywhere in it, also inside functions), as absolute names."""
    package = name if os.path.basename(path).startswith("__init__.") else name.rpartition(".")[0]
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # ``from pkg import module``
    return found


def _code_and_versions(names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``({module: sha256 of its source}, {distribution: version})`` for the modules ``names`` refer to, and
    for the user's modules those import (read from their source, so the answer does not depend on what
    happens to be imported already)."""
    sources: dict[str, str] = {}
    versions: dict[str, str] = {}
    todo, seen = list(names), set()
    while todo:
        name = todo.pop()
        if not name or name in seen or _by_value(name):
            continue
        seen.add(name)
        path = _origin(name)
        if path is None:
            continue
        if os.path.realpath(path).startswith(_environment_dirs()):
            for dist in _distributions().get(name.partition(".")[0], []):
                versions[dist] = _version(dist)
            continue
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError:
            continue
        sources[name] = hashlib.sha256(source).hexdigest()
        todo.extend(_imports(source, name, path))
    return sources, versions


def identity(obj: Any, *, versions_of: Sequence[str] = ()) -> str:
    """sha256 of what decides what ``obj`` computes: its pickle, the source of the user's modules it refers
    to by reference, and the versions of Python, of the distributions it refers to and of ``versions_of``.

    >>> identity(len) == identity(len)
    True
    """
    pickler = _HashPickler()
    data = pickler.dumps(_canonical(obj, pickler))
    sources, versions = _code_and_versions(sorted(pickler.modules))
    versions |= {d: _version(d) for d in versions_of}
    env = f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return cache_key(data, env, repr(sorted(sources.items())), repr(sorted(versions.items())))


def args_key(*args: Any, **kwargs: Any) -> str:
    """sha256 of arguments by value (their pickle, sets sorted): ``args_key(1, x=2) != args_key(1, x=3)``."""
    pickler = _HashPickler()
    return hashlib.sha256(pickler.dumps(_canonical((args, sorted(kwargs.items())), pickler))).hexdigest()


def memo_key(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
    """``(namespace, key)`` of a call: the namespace from the function's code and closure, the key from its
    arguments. ``memo_key(f, (1,), {})[0] == memo_key(f, (2,), {})[0]``."""
    name = getattr(fn, "__qualname__", type(fn).__qualname__)
    safe = "".join(c if c.isalnum() else "_" for c in name)[:40]
    return f"fn-{safe}-{identity(fn)[:32]}", args_key(*args, **kwargs)


# --------------------------------------------------------------------------------------------------- cache
class Cache:
    """Cache records in one or more lakes: read from all (in order), written to the first.

    ``Cache("root://eos//me/cache")``; ``Cache(["davs://me/cache", "root://eos//group/cache"])`` also reads a
    colleague's. ``storage_options`` apply to every lake here, but a Cache pickles as its URLs only: a worker
    opens the lakes with the grid credentials of its own environment (X.509 proxy, WLCG token), so no password
    travels in a task message.
    """

    def __init__(self, urls: str | Sequence[str], **storage_options: Any) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("Cache needs at least one lake URL")
        self.storage_options = storage_options
        self._lakes: dict[str, Lake] = {}
        self._problems: dict[str, str] = {}  # first message per (operation, lake URL)
        self._down: dict[str, float] = {}  # lake URL → until when it is not tried again (it was unreachable)

    def __getstate__(self) -> dict[str, Any]:
        return {"urls": self.urls}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["urls"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Cache({self.urls!r})"

    @property
    def write_url(self) -> str:
        """The lake written to (the first)."""
        return self.urls[0]

    def lake(self, url: str) -> Lake:
        """The opened lake for ``url`` (opened once per Cache and process)."""
        if url not in self._lakes:
            lake = open_lake(url, **self.storage_options)
            assert lake is not None
            self._lakes[url] = lake
        return self._lakes[url]

    def _problem(self, what: str, url: str, exc: LakeError) -> None:
        self._problems.setdefault(f"{what} {url}", f"cache {what} failed: {exc}")
        if exc.kind == "server unreachable":  # don't wait for its timeout again on every chunk
            self._down[url] = time.monotonic() + _DOWN_FOR

    def _up(self, url: str) -> bool:
        return time.monotonic() >= self._down.get(url, 0.0)

    def problems(self) -> list[str]:
        """Each failure once, with its URL: ``["cache write failed: root://...: ... refused (...)"]``;
        cleared by reading."""
        out, self._problems = list(self._problems.values()), {}
        return out

    def lookup(self, namespace: str, keys: Iterable[str]) -> dict[str, str]:
        """``{key: lake URL}`` for the keys that have a record; one listing per lake, not one stat per key.
        A lake that cannot be listed is noted in :meth:`problems` and counts as having none."""
        wanted = set(keys)
        found: dict[str, str] = {}
        for url in self.urls:
            if not wanted or not self._up(url):
                continue
            try:
                listed = self.lake(url).cache_list(namespace)
            except LakeError as exc:
                self._problem("lookup", url, exc)
                continue
            for key in wanted & listed.keys():
                found[key] = url
            wanted -= listed.keys()
        return found

    def load(self, namespace: str, key: str, url: str | None = None) -> bytes | None:
        """The record's payload from ``url`` (else the first lake that has it), checksum verified; None if
        it is absent, unreadable or corrupt (a corrupt one is noted and will be overwritten by the rerun)."""
        for candidate in [url] if url else self.urls:
            if not self._up(candidate):
                continue
            try:
                data = self.lake(candidate).cache_get(namespace, key)
            except LakeError as exc:
                self._problem("corrupt record" if exc.kind == "corrupt" else "read", candidate, exc)
                continue
            if data is not None:
                return data
        return None

    def store(self, namespace: str, key: str, data: bytes) -> str | None:
        """Write a record to the first lake; returns None, or the failure's one-line message (never raises)."""
        if not self._up(self.write_url):
            return self._problems.get(f"write {self.write_url}", f"cache write skipped: {self.write_url} is down")
        try:
            self.lake(self.write_url).cache_put(namespace, key, data)
        except LakeError as exc:
            self._problem("write", self.write_url, exc)
            return f"cache write failed: {exc}"
        return None

    def describe(self, namespace: str, about: str) -> None:
        """Say what made a namespace (shown by ``mqexec cache ls``); written once, failures noted."""
        lake = self.lake(self.write_url)
        try:
            if lake.cache_get(namespace, ABOUT) is None:
                lake.cache_put(namespace, ABOUT, about.encode())
        except LakeError as exc:
            self._problem("write", self.write_url, exc)

    def plan(
        self, fn: Callable[..., Any], calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]], *, safe: bool = False
    ) -> MemoPlan:
        """What to do for memoized calls of ``fn``: which are cached already (one lookup for all of them)
        and the wrapper to run the others with (see :class:`MemoPlan`). ``safe``: hits are unpickled through
        the allow-list (``mqexec.safepickle``) — who can write the lake (a worker, a colleague) is trusted no
        more than a worker's results."""
        namespace = memo_key(fn, (), {})[0]
        keys = [args_key(*args, **kwargs) for args, kwargs in calls]
        found = self.lookup(namespace, keys)
        hits: dict[int, Any] = {}
        refused: dict[int, BaseException] = {}
        for i, key in enumerate(keys):
            data = self.load(namespace, key, found[key]) if key in found else None
            if data is not None:
                try:
                    hits[i] = safe_loads(data) if safe else pickle.loads(data)
                except UnsafeResultError as exc:  # never used, never run again over it: the caller says so
                    refused[i] = exc
        return MemoPlan(Memoized(fn, self, namespace), keys, hits, refused)


@dataclass
class MemoPlan:
    """The outcome of :meth:`Cache.plan` for ``calls``: ``hits[i]`` is the cached value of call ``i``; every
    other call ``i`` runs as ``function(keys[i], *args, **kwargs)`` on a worker, which stores its result."""

    function: Memoized
    keys: list[str]
    hits: dict[int, Any]
    refused: dict[int, BaseException] = field(default_factory=dict)  #: records the allow-list refused (``safe``)


class Memoized:
    """``fn`` as a task that reads and writes the cache: ``Memoized(fn, cache, namespace)(key, *args)``.

    On the worker: a record for ``key`` (written meanwhile by another run) is returned without running
    ``fn``; otherwise ``fn`` runs and its result is stored before it is returned. A failing store is logged
    once per lake and process; the result is returned all the same.
    """

    _warned: set[str] = set()  # lakes whose write failure was logged in this process

    def __init__(self, fn: Callable[..., Any], cache: Cache, namespace: str) -> None:
        self.fn, self.cache, self.namespace = fn, cache, namespace

    def __call__(self, key: str, *args: Any, **kwargs: Any) -> Any:
        import cloudpickle

        data = self.cache.load(self.namespace, key)
        if data is not None:
            return pickle.loads(data)
        value = self.fn(*args, **kwargs)
        error = self.cache.store(self.namespace, key, cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        if error and self.cache.write_url not in Memoized._warned:
            Memoized._warned.add(self.cache.write_url)
            log.warning("%s (results are returned, not cached)", error)
        return value
