"""Broker URLs and connections: pick a transport by URL, connect once, and say in words why it failed.

    "amqps://user:pw@host:5671/vhost"          one broker (TLS; verified against ``tls_ca`` or the system CAs)
    "amqp://a:5672//;amqp://b:5672//"          failover brokers of one cluster: on every (re)connect, the one that
                                               answered last first, then the others in order
    "filesystem:///tmp/mqexec-1a2b"            the embedded default (kombu's file transport, see fstransport.py)

kombu retries a refused connection forever by default; mqexec instead tries each URL once, within
``connect_timeout`` seconds, and raises :class:`BrokerError` with a sentence naming the cause — wrong host, port,
password, vhost, CA or certificate name. A password never appears in a message (:func:`redact`).

A broker may also vanish without a word (a NAT forgot the connection: no FIN, no RST). Every wait for its answer
on a connection made here — a declare, a publisher confirm, the close handshake — is therefore bounded
(:func:`io_timeout`, two heartbeat intervals), and a connection that failed is dropped without a handshake
(:func:`drop`).

>>> redact("amqp://guest:SECRET@host:5672//")
'amqp://guest:***@host:5672//'
>>> transport_of("amqp://guest:guest@127.0.0.1:5672//").quorum
True
"""

from __future__ import annotations

import contextlib
import difflib
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from kombu import Connection

    from .config import Config


@dataclass(frozen=True)
class Transport:
    """What a broker URL scheme can do; the rest of mqexec asks this instead of testing the scheme."""

    kombu_scheme: str
    quorum: bool  #: quorum queues, delivery limits, dead-lettering, consumer counts (RabbitMQ)
    confirms: bool  #: publisher confirms
    heartbeats: bool  #: AMQP heartbeats (a silent peer is noticed)
    tls: bool = False


_TRANSPORTS = {
    "amqp": Transport("pyamqp", quorum=True, confirms=True, heartbeats=True),
    "pyamqp": Transport("pyamqp", quorum=True, confirms=True, heartbeats=True),
    "amqps": Transport("pyamqp", quorum=True, confirms=True, heartbeats=True, tls=True),
    "filesystem": Transport("mqfs", quorum=False, confirms=False, heartbeats=False),
}


def redact(url: str) -> str:
    """The URL (or ``;``-list of URLs) with every password replaced by ``***`` — also in malformed URLs."""
    if ";" in url:
        return ";".join(redact(u) for u in url.split(";"))
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    sep = head.find("://")
    # "amqp://user:pw@host"; "amqp:user:pw@host" (a scheme, then user:pw); "user:pw@host" (no scheme at all)
    start = sep + 3 if sep >= 0 else (head.find(":") + 1 if head.count(":") >= 2 else 0)
    user, colon, _ = head[start:].partition(":")
    return f"{head[:start]}{user}:***@{tail}" if colon else url


def split_urls(url: str) -> list[str]:
    """``"a;b;c"`` → ``["a", "b", "c"]`` (kombu's failover syntax)."""
    return [u.strip() for u in url.split(";") if u.strip()]


def _check_url(url: str) -> Transport:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in _TRANSPORTS:
        near = difflib.get_close_matches(scheme, _TRANSPORTS, n=1)
        hint = f"; did you mean {near[0]}://?" if near else ""
        raise ConfigError(
            f"unknown broker scheme {scheme!r} in {redact(url)}{hint} (mqexec speaks {', '.join(sorted(_TRANSPORTS))})"
        )
    transport = _TRANSPORTS[scheme]
    if not url[len(scheme) :].startswith("://"):
        raise ConfigError(f"broker URL {redact(url)} lacks '//' after '{scheme}:' (e.g. {scheme}://user:pw@host:5672/)")
    if transport.kombu_scheme == "mqfs":
        return transport
    parts = urlsplit(url)
    if not parts.hostname:
        raise ConfigError(f"broker URL {redact(url)} names no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError:
        port = parts.netloc.rpartition(":")[2]
        raise ConfigError(f"broker URL {redact(url)} has port {port!r}: not a number from 1 to 65535") from None
    return transport


def transport_of(url: str) -> Transport:
    """The :class:`Transport` of a broker URL (every URL of a failover list must agree); a typo gets a
    "did you mean", a malformed URL one sentence — never with its password.

    >>> transport_of("amqp:guest:SECRET@host:5672")
    Traceback (most recent call last):
    ...
    mqexec.errors.ConfigError: broker URL amqp:guest:***@host:5672 lacks '//' after 'amqp:' (e.g. amqp://user:pw@host:5672/)
    """
    if not url.strip():
        raise ConfigError(
            "no broker URL: give one (amqp://user:pw@host:5672/vhost), or none at all for the embedded default"
        )
    urls = split_urls(url) or [url]
    kinds = {_check_url(u) for u in urls}
    if len({k.kombu_scheme for k in kinds}) > 1:
        raise ConfigError(f"the failover brokers in {redact(url)} use different transports")
    return next(iter(kinds))


def _kombu_url(url: str) -> str:
    scheme = url.split(":", 1)[0].lower()
    return "pyamqp" + url[len(scheme) :] if scheme in ("amqp", "amqps") else url


def ssl_options(cfg: Config) -> dict[str, Any] | None:
    """py-amqp's TLS options for ``amqps://``: verify the server certificate and its name; a client certificate
    (``tls_cert``/``tls_key``) logs in with RabbitMQ's EXTERNAL mechanism."""
    if not cfg.transport.tls:
        return None
    opts: dict[str, Any] = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}  # None: each URL's host
    if cfg.tls_ca:
        opts["ca_certs"] = cfg.tls_ca
    if cfg.tls_cert:
        opts["certfile"] = cfg.tls_cert
        opts["keyfile"] = cfg.tls_key or cfg.tls_cert
    return opts


def io_timeout(cfg: Config) -> float:
    """How long mqexec waits for a broker that says nothing before it counts the connection as dead: two
    heartbeat intervals (as a heartbeat check would), at least ``connect_timeout``."""
    return max(2 * cfg.heartbeat, cfg.connect_timeout)


def connection(
    cfg: Config,
    url: str | None = None,
    *,
    heartbeat: float = 0,
    confirm: bool = False,
    timeout: float | None = None,
) -> Connection:
    """A kombu ``Connection`` object for ``url`` (default: the first of the config's), not yet connected;
    ``confirm``: every publish waits for the broker's confirmation; ``timeout``: the longest wait for the broker's
    answer (default :func:`io_timeout`), after which a call raises ``TimeoutError``."""
    from kombu import Connection

    target = url or split_urls(cfg.broker_url or "")[0]
    if cfg.transport.kombu_scheme == "mqfs":
        from .fstransport import kombu_args

        furl, fs_options = kombu_args(target)
        return Connection(furl, transport_options=fs_options)
    bound = timeout if timeout is not None else io_timeout(cfg)
    options: dict[str, Any] = {"read_timeout": bound, "write_timeout": bound}  # py-amqp: SO_RCVTIMEO/SO_SNDTIMEO
    if confirm:
        options["confirm_publish"] = True
    return Connection(
        _kombu_url(target),
        connect_timeout=cfg.connect_timeout,
        heartbeat=heartbeat,
        ssl=ssl_options(cfg) or False,
        login_method="EXTERNAL" if cfg.tls_cert else None,
        transport_options=options,
    )


def connect(cfg: Config, *, heartbeat: float = 0, confirm: bool = False, timeout: float | None = None) -> Connection:
    """An open connection to the first broker of the config's list that answers, or :class:`BrokerError`.

    Each URL gets ``connect_timeout`` seconds, the one that answered last first; the error names the cause of the
    first one tried. ``confirm``, ``timeout``: as for :func:`connection`.
    """
    first: BrokerError | None = None
    urls = split_urls(cfg.broker_url or "")
    last = _answered.get(cfg.broker_url or "")
    for url in sorted(urls, key=lambda u: u != last):  # a node that is down costs connect_timeout once, not each time
        conn = connection(cfg, url, heartbeat=heartbeat, confirm=confirm, timeout=timeout)
        try:
            conn.connect()
        except Exception as exc:
            drop(conn)
            first = first or explain(exc, cfg, url)
            continue
        if len(urls) > 1:
            _answered[cfg.broker_url or ""] = url
        return conn
    raise first or BrokerError("no broker URL is configured")


_answered: dict[str, str] = {}  #: failover list → the URL of it that answered last (in this process)


def drop(conn: Connection | None) -> None:
    """Let go of a connection that failed, without the close handshake: a broker that vanished would never
    answer it."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.collect()


_TOO_LARGE = re.compile(r"larger than configured max size (\d+)")  #: RabbitMQ's PRECONDITION_FAILED text


def refused_size(exc: BaseException) -> int | None:
    """The broker's ``max_message_size`` if ``exc`` is its refusal of a message as too large, else None.

    >>> refused_size(Exception("PRECONDITION_FAILED - message size 9000000 is larger than configured max size 4000000"))
    4000000
    """
    found = _TOO_LARGE.search(str(exc))
    return int(found.group(1)) if found else None


def explain(exc: BaseException, cfg: Config, url: str | None = None) -> BrokerError:
    """A :class:`BrokerError` that says in words why connecting to the broker at ``url`` failed."""
    url = url or split_urls(cfg.broker_url or "")[0]
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    where = f"{parts.hostname}:{port or (5671 if cfg.transport.tls else 5672)}"
    text = f"{type(exc).__name__}: {exc}"
    shown = redact(url)
    if "ACCESS_REFUSED" in text or type(exc).__name__ == "AccessRefused":
        who = f"user {unquote(parts.username or '')!r}" if not cfg.tls_cert else f"certificate {cfg.tls_cert}"
        return BrokerError(f"broker {shown} refused the login of {who}: wrong user name or password")
    if "NOT_ALLOWED" in text or type(exc).__name__ == "NotAllowed":
        vhost = unquote(parts.path[1:] or "/")
        return BrokerError(
            f"broker {shown} does not let this user into vhost {vhost!r}: wrong vhost, or no permissions"
        )
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        if "mismatch" in text or "not valid for" in text:
            return BrokerError(f"the TLS certificate of {where} is not issued for host {parts.hostname!r} ({shown})")
        ca = cfg.tls_ca or "the system's CA store"
        return BrokerError(
            f"the TLS certificate of {where} is not signed by a CA in {ca} ({shown}); set tls_ca "
            "(MQEXEC_TLS_CA) to the broker's CA file"
        )
    if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in text:
        return BrokerError(f"{where} does not speak TLS ({shown}): amqps:// needs the broker's TLS port, usually 5671")
    if isinstance(exc, ssl.SSLError):
        return BrokerError(f"TLS with {where} failed ({shown}): {exc.reason or exc}")
    if cfg.transport.tls and cfg.tls_cert and not Path(cfg.tls_cert).exists():
        return BrokerError(f"the client certificate {cfg.tls_cert} does not exist")
    if isinstance(exc, ConnectionRefusedError):
        return BrokerError(
            f"nothing accepts connections at {where} ({shown}): is the broker running, and is the port right?"
        )
    if isinstance(exc, socket.gaierror):
        return BrokerError(f"cannot resolve the broker host {parts.hostname!r} in {shown}")
    if isinstance(exc, socket.timeout | TimeoutError):
        return BrokerError(
            f"no answer from {where} within {cfg.connect_timeout:g} s ({shown}): a firewall, or the wrong host or port?"
        )
    if isinstance(exc, ConnectionResetError) or "Server unexpectedly closed" in text or "Connection reset" in text:
        hint = " (is it a TLS port? use amqps://)" if not cfg.transport.tls else ""
        return BrokerError(f"{where} closed the connection during the AMQP handshake ({shown}){hint}")
    return BrokerError(f"cannot connect to the broker {shown}: {type(exc).__name__}: {redact(str(exc))}")
