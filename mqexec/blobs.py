"""Payloads shipped once: large pickled functions and scattered data, addressed by sha256.

The client puts a payload once into its own small broker queue ``mqexec.blob.<sha256>`` (one message, never
consumed for good); a worker reads it with ``basic_get`` and puts it straight back, so every worker can read
it, then keeps it in its disk cache (shared by the worker's pool processes) and its process memory. The queue
expires with the client's session. A 5 MB processor called 1,000 times thus costs one 5 MB message plus one
read per worker node, not 5 GB of task messages.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .envelope import sha256
from .errors import MQExecError

if TYPE_CHECKING:
    from kombu import Connection


def blob_queue_name(prefix: str, digest: str) -> str:
    return f"{prefix}.blob.{digest}"


def _blob_queue(prefix: str, digest: str, expires: float) -> Any:
    from kombu import Queue

    return Queue(
        blob_queue_name(prefix, digest),
        exchange="",
        routing_key=blob_queue_name(prefix, digest),
        durable=True,
        auto_delete=False,
        queue_arguments={"x-expires": int(expires * 1000)},
    )


def put_blob(conn: Connection, prefix: str, data: bytes, digest: str, expires: float) -> None:
    """Publish ``data`` (whose sha256 is ``digest``) once into its blob queue; a no-op when it is there."""
    queue = _blob_queue(prefix, digest, expires)
    channel = conn.default_channel
    bound = queue(channel)
    _, count, _ = _declare(bound)
    if not count:
        from kombu import Producer

        Producer(channel).publish(
            data,
            exchange="",
            routing_key=queue.name,
            serializer=None,
            content_type="application/octet-stream",
            content_encoding="binary",
            delivery_mode=2,
        )


def _declare(bound_queue: Any) -> tuple[str, int, int]:
    result = bound_queue.queue_declare()
    if result is None:  # virtual transports answer nothing useful; ask for the size instead
        return bound_queue.name, bound_queue.channel._size(bound_queue.name), 0
    return result


class BlobCache:
    """A worker's view of blobs: process memory, then the disk cache, then the broker.

    >>> cache = BlobCache(Path("~/.cache/mqexec/blobs").expanduser(), prefix="mqexec")
    >>> data = cache.get(conn, "9f86d0...")   # doctest: +SKIP
    """

    def __init__(self, directory: Path, prefix: str, timeout: float = 60.0) -> None:
        self.directory = directory
        self.prefix = prefix
        self.timeout = timeout
        self._memory: dict[str, Any] = {}

    def loaded(self, digest: str, load: Any, conn_factory: Any) -> Any:
        """The object unpickled from blob ``digest`` — ``load(bytes)`` runs once per process."""
        return self.remember(digest, lambda: load(self.get(digest, conn_factory)))

    def remember(self, digest: str, make: Any) -> Any:
        """``make()``, computed once per process for each digest (a small, bounded memo)."""
        if digest not in self._memory:
            if len(self._memory) > 32:
                self._memory.clear()
            self._memory[digest] = make()
        return self._memory[digest]

    def get(self, digest: str, conn_factory: Any) -> bytes:
        path = self.directory / digest[:2] / digest
        try:
            data = path.read_bytes()
            if sha256(data) == digest:
                return data
        except OSError:
            pass
        with conn_factory() as conn:
            data = self._fetch(conn, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return data

    def _fetch(self, conn: Connection, digest: str) -> bytes:
        name = blob_queue_name(self.prefix, digest)
        channel = conn.channel()
        gone = MQExecError(
            f"payload {digest[:12]} is not on the broker (queue {name}): "
            "the client that sent it is gone, or its session expired"
        )
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    message = channel.basic_get(name, no_ack=False)
                except conn.channel_errors:
                    raise gone from None
                if message is not None:
                    data = bytes(message.body)
                    channel.basic_reject(message.delivery_tag, requeue=True)
                    if sha256(data) != digest:
                        raise MQExecError(f"blob {name} is corrupt (sha256 differs)")
                    return data
                if time.monotonic() > deadline:
                    raise gone
                time.sleep(0.02)
        finally:
            channel.close()
