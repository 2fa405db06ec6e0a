"""A TCP relay that can go silent: the peer vanishes without FIN or RST, as after a NAT timeout on the grid.

    client ──▶ 127.0.0.1:<relay.port> ══ relay ══▶ target (e.g. a broker's AMQP port)
                                          │
                         freeze(): both directions stop; sockets stay open, bytes stay unread
                         thaw():   forwarding resumes, held bytes included
                         close():  listener and every connection closed (now the peers do see FIN)

    with HalfOpenRelay("127.0.0.1", 5672) as relay:
        conn = kombu.Connection(relay.url("amqp://guest:guest@127.0.0.1:5672//"), heartbeat=2)
        conn.connect()
        relay.freeze()          # conn.heartbeat_check() raises within ~2 heartbeats; heartbeat=0 never notices

``freeze()`` affects the connections open at that moment; connections made afterwards forward normally (a NAT
forgets old mappings, new ones work), so a client that reconnects through the same relay gets through.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

_CHUNK = 65536


class _Pair:
    """One relayed connection: two sockets and the switch that stops both directions."""

    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (downstream, upstream)
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = False

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        """Copy src → dst until either side ends; while frozen, hold what was read and stop reading."""
        try:
            while not self.closed:
                self.flowing.wait()
                data = src.recv(_CHUNK)
                self.flowing.wait()
                if not data or self.closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.flowing.set()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class HalfOpenRelay:
    """Relay ``127.0.0.1:<port>`` to ``(host, port)``; :meth:`freeze` makes the far side silently gone."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 5.0) -> None:
        self.target = (host, port)
        self._connect_timeout = connect_timeout
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._pairs: list[_Pair] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"halfopen:{self.port}", daemon=True)
        self._acceptor.start()

    def url(self, url: str) -> str:
        """``url`` (amqp://user:pw@host:port/vhost) pointed at this relay instead: same credentials and vhost."""
        parts = urlsplit(url)
        auth, at, _ = parts.netloc.rpartition("@")
        return parts._replace(netloc=f"{auth}{at}127.0.0.1:{self.port}").geturl()

    def freeze(self) -> None:
        """Stop forwarding on every open connection, both ways, without closing anything."""
        with self._lock:
            for pair in self._pairs:
                pair.flowing.clear()

    def thaw(self) -> None:
        """Resume forwarding on the frozen connections (what was held is delivered)."""
        with self._lock:
            for pair in self._pairs:
                pair.flowing.set()

    @property
    def connections(self) -> int:
        """How many relayed connections are open."""
        with self._lock:
            return sum(not p.closed for p in self._pairs)

    def close(self) -> None:
        """Close the listener and every relayed connection (the peers see the connection end)."""
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                downstream, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=self._connect_timeout)
            except OSError:
                downstream.close()  # the target is down: the client sees its connection end, as it would
                continue
            upstream.settimeout(None)
            downstream.settimeout(None)
            pair = _Pair(downstream, upstream)
            with self._lock:
                self._pairs = [p for p in self._pairs if not p.closed] + [pair]
            for src, dst in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=pair.pump, args=(src, dst), name=f"halfopen:{self.port}", daemon=True).start()
