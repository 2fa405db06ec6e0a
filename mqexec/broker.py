"""Connecting to the broker, failing fast with an error that names the cause.

kombu retries a refused connection forever by default; mqexec instead tries once, within
``connect_timeout`` seconds, and says what went wrong — wrong host, wrong port, wrong password, wrong vhost.

>>> conn = connect(Config.load(broker_url="amqp://guest:guest@127.0.0.1:5672//"))   # doctest: +SKIP
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .app import kombu_connection_args, redact
from .errors import BrokerError

if TYPE_CHECKING:
    from kombu import Connection

    from .config import Config


def connect(cfg: Config, *, heartbeat: float = 0) -> Connection:
    """An open kombu connection to the configured broker, or :class:`BrokerError` within seconds."""
    from kombu import Connection

    url, options = kombu_connection_args(cfg)
    conn = Connection(url, transport_options=options, connect_timeout=cfg.connect_timeout, heartbeat=heartbeat)
    try:
        conn.connect()
    except Exception as exc:
        conn.release()
        raise explain(exc, cfg) from None
    return conn


def explain(exc: BaseException, cfg: Config) -> BrokerError:
    """A :class:`BrokerError` that says in words why connecting to the broker failed."""
    url = cfg.broker_url or ""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"
    name = type(exc).__name__
    if name == "AccessRefused" or "ACCESS_REFUSED" in str(exc):
        return BrokerError(
            f"broker {redact(url)} refused the login of user {unquote(parts.username or '')!r}: "
            "wrong user name or password"
        )
    if name == "NotAllowed" or "NOT_ALLOWED" in str(exc):
        vhost = unquote(parts.path[1:] or "/")
        return BrokerError(
            f"broker {redact(url)} does not let this user into vhost {vhost!r}: wrong vhost, or no permissions on it"
        )
    if isinstance(exc, ConnectionRefusedError):
        return BrokerError(
            f"nothing accepts connections at {where} ({redact(url)}): is the broker running, and is the port right?"
        )
    if isinstance(exc, socket.gaierror):
        return BrokerError(f"cannot resolve the broker host {parts.hostname!r} in {redact(url)}")
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return BrokerError(
            f"no answer from {where} within {cfg.connect_timeout:g} s ({redact(url)}): "
            "a firewall, or the wrong host or port?"
        )
    return BrokerError(f"cannot connect to the broker {redact(url)}: {name}: {exc}")
