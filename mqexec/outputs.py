"""Outputs that outlive the client: files written from inside a task straight to the data lake.

    task on a worker ──open_output("skims/ttbar_{n}.parquet", "wb")──▶ <lake>/skims/ttbar_3f2a….parquet.tmp-…
                     ──close()──▶ renamed to <lake>/skims/ttbar_3f2a….parquet (atomic) ── f.url names it
    client, at the end ──save_output(url, accumulator)──▶ <url> (coffea.util.save's format, atomic)

Which lake? The one of the task being run, set by the worker around each call with :func:`task_context`;
outside a task (a local run, a script) ``MQEXEC_LAKE_URL``. Inside a processor::

    >>> with mqexec.lake.open_output("skims/ttbar_{n}.parquet", "wb") as f:    # doctest: +SKIP
    ...     ak.to_parquet(selected, f)
    >>> f.url                                                                  # doctest: +SKIP
    'root://eos.example//user/a/lake/skims/ttbar_3f2a9c01d4e5b6a7.parquet'

``{n}`` is a name unique to the task (16 hex digits of its key; ``-1``, ``-2``… for further outputs of the same
pattern in one task), the same when the task is run again, so a redelivered or rerun task replaces its file
instead of adding one; ``{key}`` is the whole task key.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .lake import Lake, LakeError, open_lake

__all__ = ["load_output", "open_output", "save_output", "task_context"]


@dataclass
class _Task:
    lake: str | None
    key: str
    opened: dict[str, int] = field(default_factory=dict)  # pattern → outputs opened with it so far


_CURRENT: ContextVar[_Task | None] = ContextVar("mqexec_task", default=None)
_LAKES: dict[str, Lake] = {}


@contextlib.contextmanager
def task_context(lake: str | None, key: str) -> Iterator[None]:
    """Around one call on a worker: ``with task_context(task.lake, call.key): value = fn(*args)`` — tells
    :func:`open_output` which lake to write to and names ``{n}``/``{key}`` after the call's key."""
    token = _CURRENT.set(_Task(lake, key))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _lake(url: str) -> Lake:
    if url not in _LAKES:
        lake = open_lake(url)
        assert lake is not None
        _LAKES[url] = lake
    return _LAKES[url]


def _split(url: str) -> tuple[str, str]:
    """``root://h//a/b/c.coffea`` → (``root://h//a/b``, ``c.coffea``): the folder as a lake, the name in it."""
    if "://" not in url:
        url = "file://" + os.path.abspath(os.path.expanduser(url))
    folder, _, name = url.rpartition("/")
    if not name or folder.endswith(":/"):
        raise LakeError(f"{url}: not the URL of a file (it names no file in a folder)")
    return folder, name


def open_output(name: str, mode: str = "wb") -> Any:
    """A binary file that appears at ``<lake>/<name>`` when closed (atomically), or at ``name`` itself if it
    is a URL; ``.url`` is its final URL. An exception inside ``with`` leaves nothing behind.

    >>> with open_output("/tmp/mqexec-demo/out_{n}.txt") as f:    # doctest: +SKIP
    ...     f.write(b"hello")
    """
    if mode not in ("wb", "w+b", "bw"):
        raise ValueError(f"open_output writes new binary files: mode 'wb', not {mode!r}")
    task = _CURRENT.get()
    if "{" in name:
        if task is None:
            unique, key = uuid.uuid4().hex[:16], uuid.uuid4().hex
        else:
            i = task.opened.get(name, 0)
            task.opened[name] = i + 1
            digest = hashlib.sha256(task.key.encode()).hexdigest()
            unique, key = digest[:16] + (f"-{i}" if i else ""), task.key
        try:
            name = name.format(n=unique, key=key)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"open_output({name!r}): only {{n}} and {{key}} are filled in ({exc})") from None
    if "://" in name or os.path.isabs(name):
        folder, rel = _split(name)
        return _lake(folder).open_write(rel)
    lake_url = (task.lake if task else None) or os.environ.get("MQEXEC_LAKE_URL") or None
    if not lake_url:
        raise LakeError(
            f"open_output({name!r}): no data lake to write to: give the client a lake_url (MQEXEC_LAKE_URL), "
            "or pass a full URL"
        )
    return _lake(lake_url).open_write(name)


def save_output(url: str, obj: Any) -> str:
    """Write ``obj`` to ``url`` as ``coffea.util.save`` does (lz4-compressed cloudpickle), atomically; returns
    the URL. Read it back with ``coffea.util.load`` (file://, root://) or ``load_output``."""
    import cloudpickle
    import lz4.frame

    folder, name = _split(url)
    return _lake(folder).write(name, lz4.frame.compress(cloudpickle.dumps(obj)))


def load_output(url: str) -> Any:
    """What :func:`save_output` wrote at ``url``."""
    import lz4.frame

    folder, name = _split(url)
    return pickle.loads(lz4.frame.decompress(_lake(folder).read(name)))
