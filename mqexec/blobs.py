"""Payloads shipped once: big pickled functions, arguments, dependency values and scattered data, by sha256.

    client ──put once──▶ queue P.blob.<sha256>            (one message; a big one in pieces P.blob.<sha>.<i>)
    worker ──basic_get + requeue──▶ disk cache (shared by its pool processes) ──▶ process memory

A blob queue holds its message for good (every worker reads it and puts it back) and expires with its client's
session. A 5 MB processor called 1,000 times costs one 5 MB message plus one read per worker node, not 5 GB of
task messages. Pieces keep every message below the broker's size limit (16 MiB by default on RabbitMQ 4).
A blob the broker no longer has (its node died, its queue expired) is reported to the client, which puts it
again and resends the task.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .broker import drop
from .errors import MQExecError
from .topology import blob_queue_names
from .wire import sha256

if TYPE_CHECKING:
    from .config import Config


class MissingBlob(MQExecError):
    """A payload a task refers to is not on the broker (any more)."""


def pieces(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into pieces of at most ``size`` bytes (one piece if it fits)."""
    if len(data) <= size:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def piece_count(length: int, size: int) -> int:
    """How many :func:`pieces` ``length`` bytes make, as a :class:`~mqexec.wire.Ref` counts them: 0 for one piece.

    >>> piece_count(10, 4), piece_count(4, 4)
    (3, 0)
    """
    return 0 if length <= size else -(-length // size)


class BlobCache:
    """A worker's view of blobs: process memory, then the disk cache, then the broker.

    >>> cache = BlobCache(cfg, connect=lambda: broker.connect(cfg))         # doctest: +SKIP
    >>> data = cache.get("9f86d0...", size=5_000_000, parts=0)              # doctest: +SKIP
    """

    def __init__(self, cfg: Config, connect: Any) -> None:
        self.cfg = cfg
        self.directory = Path(cfg.cache_dir) / "blobs"
        self._connect = connect
        self._memory: dict[str, Any] = {}

    def remember(self, digest: str, make: Any) -> Any:
        """``make()``, computed once per process for each digest (a small, bounded memo)."""
        if digest not in self._memory:
            if len(self._memory) > 64:
                self._memory.clear()
            self._memory[digest] = make()
        return self._memory[digest]

    def get(self, digest: str, size: int, parts: int) -> bytes:
        """The bytes of blob ``digest`` (``parts`` pieces, 0: one message), verified against its sha256.

        Raises:
            MissingBlob: the broker does not have it.
        """
        path = self.directory / digest[:2] / digest
        try:
            data = path.read_bytes()
            if len(data) == size and sha256(data) == digest:
                return data
        except OSError:
            pass
        names = blob_queue_names(self.cfg, digest, parts)
        conn = self._connect()
        try:
            data = b"".join(_read(conn, name) for name in names)
        except BaseException:
            drop(conn)
            raise
        conn.release()
        if sha256(data) != digest:
            raise MQExecError(f"blob {digest[:12]} is corrupt on the broker (sha256 differs)")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return data


def _read(conn: Any, name: str, wait: float = 5.0) -> bytes:
    """Read the one message of blob queue ``name`` and put it back for the next worker."""
    channel = conn.channel()
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                message = channel.basic_get(name, no_ack=False)
            except conn.channel_errors:
                raise MissingBlob(
                    f"payload queue {name} is not on the broker: it expired, or its node was lost"
                ) from None
            if message is not None:
                data = bytes(message.body)
                channel.basic_reject(message.delivery_tag, requeue=True)
                return data
            if time.monotonic() > deadline:  # another worker holds it for a moment, or it is gone
                raise MissingBlob(f"payload queue {name} is empty")
            time.sleep(0.02)
    finally:
        with contextlib.suppress(Exception):  # the channel may have died with the NOT_FOUND above
            channel.close()
