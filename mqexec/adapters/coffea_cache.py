"""The chunk cache of :class:`~mqexec.adapters.coffea.MQExecutor`: which of Runner's items are done already.

    Runner ──(items, function)──▶ stage(cache, function, items)
        namespace = "coffea-<kind>-<processor>-" + identity(processor, Runner's options, versions)
        key(item)  = the item (dataset, file, tree, entry range, user metadata) + the file's identity
        ──Stage.lookup()── one listing per lake ──▶ hits: Stage.load(i) on the client (sha256 checked)
                                                 ──▶ misses: tasks; the worker stores each output as it ends

What identifies a run (``namespace``): for chunks, the processor (:func:`mqexec.cache.identity`: its state, its
code, the user's modules it uses), Runner's ``format``, ``schema``, ``savemetrics``, ``use_dataframes``,
``use_result_type``, ``uproot_options`` (but ``timeout``) and ``iteritems_options``, and the versions of Python,
coffea, awkward, uproot and numpy; for preprocessing, ``align_clusters``, the ``uproot_options`` and the versions.
What identifies a file: its size and modification time, read by the client once per file and stage (in
parallel); where the client cannot see the file, ROOT's file UUID alone (written anew with every file, so a
replaced file still misses) — and a file with neither (a parquet file the client cannot see) is not cached.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..cache import Cache, args_key, identity, loads_detached
from ..lake import cache_key

__all__ = ["Stage", "decode", "stage"]

_VERSIONS = ("coffea", "awkward", "uproot", "numpy")
_CHUNK_FUNCTIONS = {"_work_function"}
_METADATA_FUNCTIONS = {"metadata_fetcher_root", "metadata_fetcher_parquet"}
_THREADS = 8  #: parallel stats and record reads on the client


def decode(record: bytes) -> Any:
    """A record's payload (lz4-compressed pickle, as the task sends it) → the output."""
    import lz4.frame

    from ..safepickle import loads

    return loads(lz4.frame.decompress(record))


@dataclass
class Stage:
    """One of Runner's stages (preprocessing or chunks) under a cache: ``keys[i]`` is item ``i``'s record
    name, or None if it is not cached."""

    cache: Cache
    namespace: str
    keys: list[str | None]
    about: str

    def lookup(self) -> dict[int, str]:
        """``{item index: lake URL}`` of the items that have a record (one listing per lake)."""
        found = self.cache.lookup(self.namespace, [k for k in self.keys if k])
        return {i: found[k] for i, k in enumerate(self.keys) if k and k in found}

    def load(self, hits: dict[int, str]) -> dict[int, Any]:
        """The outputs of ``hits``, read in parallel; an unreadable or corrupt record is left out (it runs)."""

        def one(i: int) -> tuple[int, bytes | None]:
            key = self.keys[i]
            assert key is not None
            return i, self.cache.load(self.namespace, key, hits[i])

        with ThreadPoolExecutor(_THREADS) as pool:
            return {i: decode(data) for i, data in pool.map(one, hits) if data is not None}


def _work(function: Callable[..., Any]) -> tuple[Any, bool]:
    """coffea's own work function inside Runner's ``automatic_retries`` wrapper, and ``use_result_type``."""
    use_result_type = False
    inner: Any = function
    for _ in range(4):
        if not isinstance(inner, functools.partial):
            break
        if getattr(inner.func, "__name__", "") != "automatic_retries":
            break
        use_result_type = bool(inner.keywords.get("use_result_type", False))
        inner = inner.args[2] if len(inner.args) >= 3 else None
    return inner, use_result_type


def _name(fn: Any) -> str:
    return getattr(fn.func if isinstance(fn, functools.partial) else fn, "__name__", "")


def _run_identity(function: Callable[..., Any]) -> tuple[str, str, str] | str:
    """``(kind, namespace, about)`` of Runner's function, or why it cannot be cached."""
    import lz4.frame

    inner, use_result_type = _work(function)
    name = _name(inner)
    if name in _METADATA_FUNCTIONS:
        args = inner.args if isinstance(inner, functools.partial) else ()
        options = {k: v for k, v in (args[2] if len(args) > 2 else {}).items() if k != "timeout"}
        what: tuple[Any, ...] = ("coffea metadata", name, args[1] if len(args) > 1 else None, options, use_result_type)
        return "metadata", f"coffea-metadata-{identity(what, versions_of=_VERSIONS)[:32]}", "coffea preprocessing"
    if name not in _CHUNK_FUNCTIONS or len(inner.args) != 5:
        return f"Runner's work function is not one mqexec knows ({name or type(inner).__name__})"
    fmt, _timeout, schema, use_dataframes, savemetrics = inner.args
    kw = inner.keywords
    processor = kw.get("processor_instance")
    if isinstance(processor, bytes):
        processor = loads_detached(lz4.frame.decompress(processor))
    if isinstance(processor, str):  # DaskExecutor's "heavy" input: not ours
        return "the processor is not in Runner's function"
    options = {k: v for k, v in (kw.get("uproot_options") or {}).items() if k != "timeout"}
    what = ("coffea chunk", fmt, schema, use_dataframes, savemetrics, use_result_type, options,
            kw.get("iteritems_options") or {}, processor)  # fmt: skip
    label = "".join(c if c.isalnum() else "_" for c in type(processor).__name__)[:40]
    namespace = f"coffea-chunks-{label}-{identity(what, versions_of=_VERSIONS)[:32]}"
    return "chunks", namespace, f"coffea chunks of {type(processor).__module__}.{type(processor).__qualname__}"


def _file_id(filename: str) -> str | None:
    """``"<size>:<mtime>"`` of a local or fsspec-reachable file, or None if the client cannot see it."""
    try:
        if "://" not in filename or filename.startswith("file://"):
            st = os.stat(filename.removeprefix("file://"))
            return f"{st.st_size}:{st.st_mtime_ns}"
        import fsspec

        fs, path = fsspec.core.url_to_fs(filename)
        info = fs.info(path)
        return f"{info['size']}:{info.get('mtime', info.get('modified', ''))}"
    except Exception:  # any failure to see the file means: identify it otherwise
        return None


def _item_key(kind: str, item: Any, file_id: str | None) -> str | None:
    if kind == "metadata":
        if file_id is None:
            return None
        return cache_key("metadata", item.dataset, item.filename, item.treename or "", args_key(item.metadata),
                         file_id)  # fmt: skip
    uuid = bytes(item.fileuuid or b"")
    if file_id is None and (not uuid or uuid == hashlib.md5(str(item.filename).encode()).digest()):
        return None  # no content identity: parquet's UUID is a hash of the name
    return cache_key("chunk", item.dataset, item.filename, item.treename or "", item.entrystart, item.entrystop,
                     uuid, args_key(item.usermeta), file_id or "uuid-only")  # fmt: skip


def stage(cache: Cache, function: Callable[..., Any], items: Sequence[Any]) -> Stage | str:
    """The :class:`Stage` of Runner's ``items`` for ``function``, or why they cannot be cached (a sentence)."""
    try:
        found = _run_identity(function)
    except Exception as exc:  # a processor that cannot be pickled again here: run it, uncached
        return f"cannot identify the processor ({type(exc).__name__}: {exc})"
    if isinstance(found, str):
        return found
    kind, namespace, about = found
    names = sorted({str(item.filename) for item in items})
    with ThreadPoolExecutor(_THREADS) as pool:
        ids = dict(zip(names, pool.map(_file_id, names), strict=True))
    keys = [_item_key(kind, item, ids[str(item.filename)]) for item in items]
    return Stage(cache, namespace, keys, about)
