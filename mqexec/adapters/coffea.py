"""coffea's ``processor.Runner`` on mqexec workers: :class:`MQExecutor`, one small ``ExecutorBase`` dataclass.

    Runner ──(items, function, accumulator)──▶ MQExecutor.__call__
        ──cache= only: items with a record in the lake are read here (coffea_cache.py), the rest go on──
        ──client.map(_Task(function), items, labels=[dataset/file [entries]])──▶ broker ──▶ workers
              (cache=: a worker stores each output in the lake as soon as it is computed)
              (the function, with the lz4-pickled processor inside, is shipped once per worker by hash;
               a task message carries one WorkItem / FileMeta and its readable label)
        ◀──as_completed── lz4-pickled outputs ──▶ accumulate on the client as they arrive (memory flat)
        ──▶ (accumulator, 0 | exception)            (save=: written to the lake first)

Runner drives the executor twice: preprocessing (``function_name="get_metadata"``, a set of ``FileMeta``) and
chunk processing (``unit="chunk"``, a list of ``WorkItem``). Runner wraps the function in its
``automatic_retries`` (``retries``, ``skipbadfiles``, ``use_result_type``); that wrapper runs inside the task,
on the worker, so retries cost no round trip and no mqexec-level retries are added on top. A worker that
dies mid-chunk is not a retry: the broker delivers the task again, and the client keeps the first result
of every chunk, so none is lost or counted twice.

coffea is imported by this module, which ``mqexec`` loads only when ``mqexec.MQExecutor`` is first looked up;
``mqexec worker`` imports it only when it unpickles a task of this module.

One piece because: ``MQExecutor`` is one ``ExecutorBase`` dataclass, and the small task wrappers it ships to
the workers (``_Task``, ``_merge``) are half of its contract with coffea's Runner; its cache lives in
``coffea_cache.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import pickle
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lz4.frame
from coffea.processor.accumulator import accumulate
from coffea.processor.executor import ExecutorBase
from coffea.util import rich_bar

from ..client import Client
from ..futures import as_completed
from ..summary import Run

if TYPE_CHECKING:
    from ..cache import Cache

__all__ = ["MQExecutor"]

log = logging.getLogger("mqexec.coffea")

_SKIP_MESSAGE = "Skipping bad file"  #: what coffea's ``Runner.automatic_retries`` warns when it skips


# ------------------------------------------------------------------------------ runs on the workers
def _pack(out: Any, level: int | None) -> bytes:
    """An output as it travels: pickled (lz4-compressed at ``level``, None: not compressed)."""
    data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    return data if level is None else lz4.frame.compress(data, compression_level=level)


def _unpack(out: bytes, level: int | None) -> Any:
    """An output back, through the restricted unpickler (``mqexec.allow`` adds classes): a worker's output is
    never unpickled unrestricted, on the client or on the worker that merges it."""
    from ..safepickle import loads

    return loads(out if level is None else lz4.frame.decompress(out))


class _Skipped:
    """A task's answer for an item that ``skipbadfiles`` skipped, with coffea's reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Skipped, (self.reason,))


def _original(exc: BaseException) -> BaseException:
    """The exception coffea wrapped in a bare ``Exception("Failed processing file: ...") from original``.

    Only the original survives pickling with its type (``__cause__`` is not pickled), and Runner's
    ``skipbadfiles``/``use_result_type`` checks look for that type (e.g. ``OSError``) in the chain."""
    while type(exc) is Exception and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    return exc


class _WriteFailed:
    """A task's output whose cache record could not be written, with the one-line reason (cache)."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: str) -> None:
        self.value, self.error = value, error

    def __reduce__(self) -> tuple[Any, ...]:
        return (_WriteFailed, (self.value, self.error))


class _Task:
    """Runner's function for one item, as an mqexec task: compresses the output, reports skipped items.

    With a cache (``cache``, ``namespace``, and the item's ``key``): returns the record if another run wrote it
    meanwhile, else stores the output in the cache as soon as it is computed. ``lake`` is where
    :func:`mqexec.lake.open_output` writes from inside the processor."""

    __slots__ = ("__name__", "cache", "compression", "function", "lake", "namespace")

    def __init__(
        self,
        function: Callable[[Any], Any],
        compression: int | None,
        cache: Cache | None = None,
        namespace: str = "",
        lake: str | None = None,
    ) -> None:
        self.function = function
        self.__name__ = "_Task"  # MQExecutor names it after the processor: what Flower and the logs show
        self.compression = compression
        self.cache, self.namespace, self.lake = cache, namespace, lake

    def __call__(self, item: Any, key: str | None = None) -> Any:
        # ---- cache: a record written meanwhile (another client, a redelivery) is the answer
        if self.cache is not None and key:
            record = self.cache.load(self.namespace, key)
            if record is not None:
                return record if self.compression is not None else _pack(_unpack(record, 1), None)
        error: BaseException | None = None
        with warnings.catch_warnings(record=True) as caught, self._outputs(item, key):
            warnings.simplefilter("always")
            try:
                out = self.function(item)
            except Exception as exc:
                error = exc
        for w in caught:  # pass the processor's warnings on to the worker's log
            if _SKIP_MESSAGE not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if error is not None:
            raise _original(error)  # outside the except block: no misleading __context__
        if out is None:
            skipped = [str(w.message) for w in caught if _SKIP_MESSAGE in str(w.message)]
            return _Skipped(skipped[-1] if skipped else "the function returned None")
        packed = _pack(out, self.compression)
        # ---- cache: store the output now, so that a client killed later loses nothing done
        if self.cache is not None and key:
            failed = self.cache.store(self.namespace, key, packed if self.compression is not None else _pack(out, 1))
            if failed:
                return _WriteFailed(packed, failed)
        return packed

    def _outputs(self, item: Any, key: str | None) -> contextlib.AbstractContextManager[None]:
        if self.lake is None:
            return contextlib.nullcontext()
        from ..outputs import task_context

        return task_context(self.lake, key or _label(item, None))


def _merge(outputs: list[Any], compression: int | None) -> Any:
    """Merge a batch of (compressed) outputs on a worker; the client merges the merged ones."""
    return _pack(accumulate(_unpack(o, compression) for o in outputs), compression)


# ------------------------------------------------------------------------------ runs on the client
def _label(item: Any, function_name: str | None) -> str:
    """``ttbar__nominal/file_003.root [100000-200000]`` for a chunk; ``... (metadata)`` for a file."""
    name = f"{item.dataset}/{os.path.basename(str(item.filename))}"
    if hasattr(item, "entrystart"):
        return f"{name} [{item.entrystart}-{item.entrystop}]"
    return f"{name} ({function_name or 'metadata'})"


class _Session:
    """The client shared by an executor and its ``copy()``s; an embedded default is started on first use."""

    def __init__(self, client: Client | None, broker: str | None) -> None:
        self._client = client
        self._broker = broker
        self._owned: Client | None = None
        self._lock = threading.Lock()

    def client(self) -> Client:
        with self._lock:
            if self._client is not None:
                return self._client
            if self._owned is None or self._owned.status == "closed":
                self._owned = Client(self._broker)
                atexit.register(self.close)
            return self._owned

    def close(self) -> None:
        with self._lock:
            owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()


def _open_cache(cache: str | list[str] | None) -> Cache | None:
    from ..cache import Cache

    return Cache(cache) if cache else None


def _wrapped(acc: Any) -> bool:
    """Runner's own wrapping of the output: ``{"out": ..., "processed": ..., "metrics": ...}``."""
    return isinstance(acc, dict) and "out" in acc and "processed" in acc


class _NoBar:
    """``status=False``: no progress display at all (rich's ``add_task`` has no ``disable``)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class MQExecutor(ExecutorBase):
    """coffea executor that runs chunks on ``mqexec worker`` processes through a message broker.

    >>> from coffea import processor
    >>> from coffea.nanoevents import NanoAODSchema
    >>> from mqexec import MQExecutor
    >>> runner = processor.Runner(executor=MQExecutor(), schema=NanoAODSchema, chunksize=100_000,
    ...                           savemetrics=True)                       # embedded default: local workers
    >>> out, metrics = runner(fileset, processor_instance=TtbarAnalysis(), treename="Events")  # doctest: +SKIP
    >>> MQExecutor(broker="amqps://user:pw@broker.example:5671/vhost")    # workers attached to that broker
    ... # doctest: +SKIP
    >>> MQExecutor(client=mqexec.Client(url, secret=...))                 # or a client of your own
    ... # doctest: +SKIP

    ``status``, ``unit``, ``desc``, ``compression`` (lz4 level of the outputs in flight, None: off) and
    ``function_name`` are coffea's (:class:`coffea.processor.ExecutorBase`). Runner's ``savemetrics``,
    ``skipbadfiles``, ``maxchunks`` and ``use_result_type`` work as with coffea's own executors.

    Args:
        client: an :class:`mqexec.Client` to use (left open); by default one is made on first use.
        broker: broker URL for that default client; None (and no ``MQEXEC_BROKER_URL``) → the embedded
            default, local worker processes on a local broker (stopped by :meth:`close` or at exit).
        retries: attempts after the first for an item that raises, made by Runner's ``automatic_retries``
            inside the task on the worker (a worker that dies is handled by redelivery, not by retries).
        recoverable: on an error return ``(partial accumulator, exception)`` instead of raising; the chunks
            not yet run are cancelled.
        merging: 0 merges every output on the client as it arrives; ``n >= 2`` first sends batches of ``n``
            finished outputs to a worker to be merged there (see docs/benchmarks.md for which is faster).
        cache: a data-lake URL (or a list: read from all, write to the first) where every chunk's output and
            every file's preprocessing metadata are kept, keyed by the processor's code and state, the file,
            the entry range and the versions; a rerun reads them instead of running (docs/lake.md).
        save: a URL (``davs://.../agc.coffea``) where the merged output is written at the end (before
            ``postprocess``), in ``coffea.util.save``'s format, atomically.

    Returns (from a call): ``(accumulator, 0)``, or ``(partial accumulator, exception)`` if ``recoverable``;
    also for empty input.
    """

    client: Client | None = None
    broker: str | None = None
    retries: int = 3
    recoverable: bool = False
    merging: int = 0
    cache: str | list[str] | None = None
    save: str | None = None

    def __post_init__(self) -> None:
        if self.client is not None and self.broker is not None:
            raise ValueError("give MQExecutor a client or a broker URL, not both")
        if self.merging == 1 or self.merging < 0:
            raise ValueError(f"merging must be 0 (on the client) or a batch size >= 2, got {self.merging}")
        self._session = _Session(self.client, self.broker)
        self._cache = _open_cache(self.cache)

    def copy(self, **kwargs: Any) -> MQExecutor:
        """A copy with some fields changed (Runner uses it per stage); it shares this executor's client."""
        new = dataclasses.replace(self, **kwargs)
        new._session = self._session
        return new

    def close(self) -> None:
        """Stop the client this executor made (a client passed in stays open)."""
        self._session.close()

    def __enter__(self) -> MQExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("client", "_session")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, client=None)
        self._session = _Session(None, self.broker)
        self._cache = _open_cache(self.cache)

    def __call__(
        self, items: Iterable[Any], function: Callable[[Any], Any], accumulator: Any
    ) -> tuple[Any, int | BaseException]:
        items = list(items)
        if not items:
            return accumulator, 0
        client = self._session.client()
        chunks = hasattr(items[0], "entrystart")
        run = Run(client) if chunks else None  # ---- run summary (mqexec/summary.py): starts the clock
        # ---- cache: the items done before are read, not run
        task = _Task(function, self.compression, lake=client.config.lake_url)
        task.__name__ = self.function_name or "_Task"  # Runner sets it to the processor's class name
        keys: list[str | None] = [None] * len(items)
        hits: dict[int, Any] = {}
        note = ""
        if self._cache is not None:
            task, keys, hits, note = self._cached(task, function, items)
            for value in hits.values():
                accumulator = accumulate([value], accumulator)
            items = [x for i, x in enumerate(items) if i not in hits]
            keys = [k for i, k in enumerate(keys) if i not in hits]
        labels = [_label(item, self.function_name) for item in items]
        write_errors: list[str] = []
        try:
            out: tuple[Any, int | BaseException] = (accumulator, 0)
            if items:
                futures = client.map(
                    task, items, keys, labels=labels, pure=False, batch_size=1 if chunks else None, safe=True
                )
                out = self._gather(client, futures, labels, accumulator, write_errors)
        finally:
            self._report(note, len(hits), len(items), write_errors)
        if self.save and chunks and out[1] == 0:
            from ..outputs import save_output

            acc = out[0]
            log.info("saved the output to %s", save_output(self.save, acc["out"] if _wrapped(acc) else acc))
        if run is not None:  # ---- run summary: one block (stderr, with status=True); mqexec.summary.last() for JSON
            run.finish(out[0], chunks=len(items) + len(hits), cache_hits=len(hits), show=bool(self.status))
        return out

    # ---- cache and save: the part of a call that reads the cache, and the one report per run
    def _cached(
        self, task: _Task, function: Callable[[Any], Any], items: list[Any]
    ) -> tuple[_Task, list[str | None], dict[int, Any], str]:
        from .coffea_cache import stage

        assert self._cache is not None
        found = stage(self._cache, function, items)
        if isinstance(found, str):
            return task, [None] * len(items), {}, f"not cached: {found}"
        self._cache.describe(found.namespace, found.about)
        hits = found.load(found.lookup())
        name, task = task.__name__, _Task(function, self.compression, self._cache, found.namespace, task.lake)
        task.__name__ = name
        return task, found.keys, hits, f"{found.about} in {self._cache.write_url}/cache/{found.namespace}"

    def _report(self, note: str, cached: int, ran: int, write_errors: list[str]) -> None:
        if self._cache is None:
            return
        problems = self._cache.problems()
        if write_errors:  # one line for all chunks: the count and the first failure, which names the lake
            problems.append(f"{len(write_errors)} of {ran} records not stored; the first: {write_errors[0]}")
        if problems:  # one warning per run, whatever the number of chunks
            warnings.warn(
                f"MQExecutor: {'; '.join(problems)} (the results are right; the cache is behind)", stacklevel=3
            )
        log.info("mqexec cache: %d of %d %ss from the cache (%s)", cached, cached + ran, self.unit or "item", note)

    def _gather(
        self, client: Client, futures: list[Any], labels: list[str], accumulator: Any, write_errors: list[str]
    ) -> tuple[Any, int | BaseException]:
        labelled = {f.key: label for f, label in zip(futures, labels, strict=True)}
        outstanding = len(futures)  # item tasks not yet consumed
        waiting = as_completed(futures)
        batch: list[Any] = []
        merges: list[Any] = []
        acc = accumulator
        try:
            with rich_bar() if self.status else _NoBar() as progress:
                bar = progress.add_task(self.desc, total=len(futures), unit=self.unit)
                for future in waiting:
                    label = labelled.pop(future.key)
                    try:
                        value = future.result()
                    except BaseException as exc:
                        exc.add_note(f"mqexec: while running {label}")
                        raise
                    finally:
                        future.release()  # merged into acc: the client need not keep it (memory stays flat)
                    if not label.startswith("merge of "):
                        outstanding -= 1
                        progress.update(bar, advance=1, refresh=True)
                    if isinstance(value, _WriteFailed):  # cache: computed, but not stored
                        write_errors.append(value.error)
                        value = value.value
                    if isinstance(value, _Skipped):
                        warnings.warn(f"MQExecutor skipped {label}: {value.reason}", stacklevel=2)
                        continue
                    if not self.merging:
                        acc = accumulate([_unpack(value, self.compression)], acc)
                        continue
                    batch.append(value)
                    if len(batch) >= self.merging and outstanding:
                        merge = client.submit(
                            _merge,
                            batch,
                            self.compression,
                            pure=False,
                            label=f"merge of {len(batch)} outputs",
                            safe=True,
                        )
                        labelled[merge.key] = f"merge of {len(batch)} outputs"
                        waiting.add(merge)
                        merges.append(merge)
                        batch = []
                for value in batch:
                    acc = accumulate([_unpack(value, self.compression)], acc)
        except Exception as exc:
            client.cancel([f for f in futures if not f.done()])
            if not self.recoverable:
                raise
            # keep what was done: outputs not merged yet, finished but unread chunks, merges in flight
            unread = [f for f in futures if f.key in labelled and f.status == "finished"]
            unread += [f for f in merges if f.key in labelled]
            for f in unread:
                try:
                    batch.append(f.result())
                except Exception:  # the first error is the one reported
                    continue
                finally:
                    f.release()
            for value in batch:
                if not isinstance(value, _Skipped):
                    acc = accumulate([_unpack(value, self.compression)], acc)
            return acc, exc
        return acc, 0
