"""``mqexec doctor``: is everything in place for a run? One line per check — ✓, or ✗ with what to do.

    config ──▶ broker URL(s): reachable (TCP) ──▶ TLS: certificate trusted, days left ──▶ login ──▶ vhost
           ──▶ on the broker: task queues (quorum, same arguments) · a probe queue P.doctor-<hex> (quorum;
               declare, publish, get, delete = the permissions on this prefix) · a probe message as big as the
               biggest mqexec sends (max_message_size) · consumer_timeout (not readable: said so, and why it
               does not limit a chunk) · workers (Celery ``stats``) · clock skew (their heartbeat events)
           ──▶ data lake(s): write, read back, delete a probe object; grid token / proxy lifetime
           ──▶ signing key: there, private

    $ mqexec doctor --broker amqps://ana:***@broker.example:5671/cms
    ✓ reachable: broker.example:5671 accepts connections
    ✓ TLS: certificate of broker.example trusted, valid 212 days
    ...
    ✗ lake: root://eos.example//ana/lake: write failed: permission denied — renew the credentials ...

Marks: ✓ fine · ! works, but look · ? cannot be known from here (the line says why) · ✗ blocks a run.
``main`` exits with 1 when a line is ✗. Nothing here prints a password, token or key.

One piece because: each check is a few lines, and together they are one report that must read in order —
reachability before login before permissions before workers.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import re
import secrets
import socket
import ssl
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .broker import connection, explain, redact, split_urls
from .config import Config
from .errors import MQExecError
from .summary import human_bytes

if TYPE_CHECKING:
    from kombu import Connection

OK, WARN, UNKNOWN, FAIL = "✓", "!", "?", "✗"
_HEARTBEAT_WAIT = 2.5  #: Celery workers send a heartbeat event every 2 s
_SKEW_WARN, _SKEW_FAIL = 2.0, 120.0  #: signed control commands older than 120 s are refused (control.py)
_EXPIRY_WARN = 14 * 86400.0  #: a certificate with less left than this is flagged
_CREDENTIAL_WARN = 3600.0  #: a grid token or proxy with less than an hour left is flagged


@dataclass(frozen=True)
class Check:
    """One line of the report: ``mark`` is one of ✓ ! ? ✗."""

    name: str
    mark: str
    text: str

    def __str__(self) -> str:
        return f"{self.mark} {self.name}: {self.text}"


def run_checks(cfg: Config, *, result_size: int | None = None, chunk_time: float | None = None) -> Iterator[Check]:
    """Every check for ``cfg``, one :class:`Check` at a time (broker checks that cannot run after a failed one
    are left out: the failed line says what to fix first).

    >>> [str(c) for c in run_checks(Config.load(broker_url="amqp://guest:guest@127.0.0.1:1//"))][0]
    ... # doctest: +SKIP
    '✗ reachable: nothing accepts connections at 127.0.0.1:1 (amqp://guest:***@127.0.0.1:1//): ...'
    """
    if cfg.broker_url is None:
        yield Check(
            "broker",
            UNKNOWN,
            "none configured — runs use the embedded default (local workers on this machine); "
            "pass --broker URL or set MQEXEC_BROKER_URL to check a broker",
        )
    elif cfg.transport.quorum:
        yield from _broker(cfg, result_size, chunk_time)
    else:
        yield Check("broker", OK, f"{redact(cfg.broker_url)}: a local file-system broker, nothing to check")
    yield from _lakes(cfg)
    yield _key(cfg)


# ----------------------------------------------------------------------------------------------------- broker
def _where(cfg: Config, url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (5671 if cfg.transport.tls else 5672)


def _broker(cfg: Config, result_size: int | None, chunk_time: float | None) -> Iterator[Check]:
    answering, silent = [], []
    for url in split_urls(cfg.broker_url or ""):
        host, port = _where(cfg, url)
        try:
            socket.create_connection((host, port), timeout=cfg.connect_timeout).close()
        except OSError as exc:
            silent.append(str(explain(exc, cfg, url)))
            continue
        answering.append(url)
        yield Check("reachable", OK, f"{host}:{port} accepts connections")
    for text in silent:  # one failover broker down is not a blocked run while another answers
        yield Check("reachable", WARN if answering else FAIL, text)
    if not answering:
        return
    url = answering[0]
    conn = connection(cfg, url)
    try:
        conn.connect()
    except Exception as exc:
        conn.release()
        yield from _refused(cfg, url, exc)
        return
    try:
        yield from _tls(cfg, url, conn)
        yield from _logged_in(cfg, url, conn)
        yield from _probe(cfg, conn)
        yield _consumer_timeout(chunk_time)
        yield from _workers_and_clocks(cfg, conn)
        if result_size is not None:
            yield _results(cfg, result_size)
    finally:
        conn.release()


def _refused(cfg: Config, url: str, exc: BaseException) -> Iterator[Check]:
    """The connection opened but the handshake failed: say which step (TLS, login, vhost) and why."""
    text = str(explain(exc, cfg, url))
    kind = type(exc).__name__
    if isinstance(exc, ssl.SSLError) or "TLS" in text:
        yield Check("TLS", FAIL, text)
    elif kind == "NotAllowed" or "NOT_ALLOWED" in str(exc):
        yield Check("login", OK, f"{_who(cfg, url)} was accepted")
        yield Check("vhost", FAIL, f"{text} — ask the broker's admin for permissions on it, or fix the URL's path")
    else:
        yield Check("login", FAIL, text)


def _who(cfg: Config, url: str) -> str:
    if cfg.tls_cert:
        return f"the certificate {cfg.tls_cert}"
    return f"user {unquote(urlsplit(url).username or 'guest')!r}"


def _tls(cfg: Config, url: str, conn: Connection) -> Iterator[Check]:
    host, port = _where(cfg, url)
    if not cfg.transport.tls:
        try:
            local = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = False
        if local:
            yield Check("TLS", OK, "plain AMQP, on this machine only")
        else:
            yield Check(
                "TLS",
                WARN,
                f"plain AMQP to {host}: the password and the tasks cross the network unencrypted — use "
                "amqps:// (the broker's TLS port, usually 5671)",
            )
        return
    sock = getattr(getattr(conn.connection, "transport", None), "sock", None)
    cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    if not cert:
        yield Check("TLS", UNKNOWN, f"connected to {host}:{port} over TLS, but the certificate could not be read")
    else:
        left = ssl.cert_time_to_seconds(str(cert["notAfter"])) - time.time()
        issuer = {str(k): str(v) for rdn in cert.get("issuer", ()) for k, v in rdn}  # type: ignore[misc,str-unpack]
        mark = OK if left > _EXPIRY_WARN else WARN
        hint = "" if mark == OK else " — tell the broker's admin it expires soon"
        yield Check(
            "TLS",
            mark,
            f"certificate of {host} trusted (issuer {issuer.get('commonName', '?')}), valid {_span(left)}{hint}",
        )
    if cfg.tls_cert:
        yield _certificate_file("client certificate", cfg.tls_cert, "ask for a new one")


def _logged_in(cfg: Config, url: str, conn: Connection) -> Iterator[Check]:
    props = conn.connection.server_properties or {}
    product = f"{_text(props.get('product'))} {_text(props.get('version'))}".strip() or "an AMQP broker"
    cluster = _text(props.get("cluster_name"))
    yield Check("login", OK, f"{_who(cfg, url)} logged in to {product}{f' (cluster {cluster})' if cluster else ''}")
    yield Check("vhost", OK, f"{unquote(urlsplit(url).path[1:] or '/')!r} is open to this user")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _probe(cfg: Config, conn: Connection) -> Iterator[Check]:
    """Task queues as mqexec declares them; a quorum probe queue under the prefix: declare (configure), publish
    (write), get (read), a message as big as the biggest mqexec sends, delete (configure)."""
    import amqp
    from amqp.exceptions import AccessRefused, NotFound, PreconditionFailed

    from .topology import task_queue, task_queue_name

    raw: amqp.Connection = conn.connection
    name = task_queue_name(cfg)
    try:
        channel = raw.channel()
        channel.queue_declare(name, passive=True)
        try:
            task_queue(cfg)(conn.channel()).declare()  # the same arguments as every client and worker
            yield Check("task queue", OK, f"{name} exists with mqexec's arguments")
        except PreconditionFailed as exc:
            yield Check(
                "task queue",
                FAIL,
                f"{name} exists with other arguments ({exc.reply_text}): an older mqexec made it — delete it "
                f"(rabbitmqctl delete_queue {name}) once it is empty, or use another queue_prefix",
            )
    except NotFound:
        yield Check("task queue", OK, f"{name} does not exist yet: the first client or worker makes it")
    except AccessRefused as exc:
        yield Check("task queue", FAIL, f"{name}: {exc.reply_text}")
    probe = f"{cfg.queue_prefix}.doctor-{secrets.token_hex(4)}"
    step = "declare"
    try:
        channel = raw.channel()
        channel.queue_declare(probe, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        step = "bind"  # through the prefix's exchange, as mqexec sends everything (never the default exchange)
        channel.exchange_declare(cfg.queue_prefix, "direct", durable=True, auto_delete=False)
        channel.queue_bind(probe, cfg.queue_prefix, routing_key=probe)
        step = "publish to"
        channel.confirm_select()
        channel.basic_publish_confirm(amqp.Message(b"mqexec doctor"), exchange=cfg.queue_prefix, routing_key=probe)
        step = "read from"
        got = channel.basic_get(probe, no_ack=True)
        if got is None or got.body != b"mqexec doctor":
            raise RuntimeError("the probe message did not come back")
    except AccessRefused as exc:
        yield Check(
            "permissions",
            FAIL,
            f"cannot {step} queue {probe}: {exc.reply_text} — this user needs configure, write and read "
            f"permissions on its queue prefix's names: `mqexec broker grant --prefix {cfg.queue_prefix} --user ...` "
            "prints them",
        )
        if step != "declare":
            _delete(raw, probe)
        return
    except (PreconditionFailed, amqp.exceptions.AMQPError, RuntimeError) as exc:
        text = getattr(exc, "reply_text", "") or str(exc)
        if step == "declare":
            yield Check(
                "quorum queues",
                FAIL,
                f"the broker refused a quorum queue ({text}): mqexec needs RabbitMQ ≥ 3.8 with the quorum_queue "
                "feature flag enabled (rabbitmqctl enable_feature_flag quorum_queue)",
            )
        else:
            yield Check("permissions", FAIL, f"cannot {step} queue {probe}: {text}")
            _delete(raw, probe)
        return
    yield Check("quorum queues", OK, f"supported (probe queue {probe})")
    yield Check("permissions", OK, f"declare, publish, read and delete under {cfg.queue_prefix}.*")
    yield _message_size(cfg, raw, probe)
    _delete(raw, probe)


def _message_size(cfg: Config, raw: Any, probe: str) -> Check:
    """Publish one message as big as the biggest mqexec sends (a result piece or blob piece of ``piece_size``,
    with its frame) and see whether the broker takes it; a refusal names the broker's limit."""
    import amqp

    size = max(cfg.piece_size, cfg.arg_inline_limit) + 4096
    try:
        channel = raw.channel()
        channel.confirm_select()
        channel.basic_publish_confirm(amqp.Message(bytes(size)), exchange=cfg.queue_prefix, routing_key=probe)
        channel.queue_purge(probe)
    except amqp.exceptions.AMQPError as exc:
        text = getattr(exc, "reply_text", "") or str(exc)
        limit = re.search(r"max size (\d+)", text)
        if limit is None:
            return Check("message size", FAIL, f"a probe message of {human_bytes(size)} was refused: {text}")
        fit = int(limit.group(1)) - 64 * 1024
        return Check(
            "message size",
            FAIL,
            f"the broker refuses messages over {human_bytes(int(limit.group(1)))} (max_message_size), mqexec sends up "
            f"to {human_bytes(size)}: set MQEXEC_PIECE_SIZE={fit} (client and workers), or raise max_message_size",
        )
    return Check(
        "message size",
        OK,
        f"a probe of {human_bytes(size)} was taken (the biggest message mqexec sends: piece_size "
        f"{human_bytes(cfg.piece_size)}); the broker's max_message_size itself is not published over AMQP",
    )


def _delete(raw: Any, queue: str) -> None:
    try:
        raw.channel().queue_delete(queue)
    except Exception as exc:  # the queue is named for doctor only; tell, but do not fail the report
        print(f"mqexec doctor: could not delete the probe queue {queue}: {exc}", file=sys.stderr)


def _consumer_timeout(chunk_time: float | None) -> Check:
    chunk = f"chunks of {_span(chunk_time)} are" if chunk_time else "a long chunk is"
    return Check(
        "consumer_timeout",
        UNKNOWN,
        "unknown — RabbitMQ does not tell AMQP clients its value (the broker's admin can: rabbitmqctl eval "
        "'application:get_env(rabbit, consumer_timeout).'); it does not limit mqexec: workers acknowledge a task "
        f"when they take it and hold a lease, so {chunk} not cut off by it",
    )


def _workers_and_clocks(cfg: Config, conn: Connection) -> Iterator[Check]:
    from .app import make_app
    from .status import worker_rows

    app = make_app(cfg)
    try:
        replies = app.control.inspect(timeout=1.0, connection=conn).stats() or {}
    except Exception as exc:
        yield Check("workers", UNKNOWN, f"could not ask the workers ({type(exc).__name__}: {redact(str(exc))})")
        return
    rows = worker_rows(replies)
    ours = [w for w in rows if w["env"] == cfg.env]
    others = sorted({f"{w['env']}{'+' + ','.join(w['resources']) if w['resources'] else ''}" for w in rows} - {cfg.env})
    elsewhere = f"; others serve {', '.join(others)}" if others else ""
    if ours:
        sites: dict[str, int] = {}
        for w in ours:
            sites[w["site"] or "outside DIRAC"] = sites.get(w["site"] or "outside DIRAC", 0) + 1
        where = ", ".join(f"{n} at {s}" for s, n in sorted(sites.items()))
        yield Check("workers", OK, f"{len(ours)} serve this client's environment {cfg.env} ({where}){elsewhere}")
    elif rows:
        yield Check(
            "workers",
            FAIL,
            f"none of the {len(rows)} connected worker(s) serves {cfg.env} (this Python){elsewhere} — start "
            f"workers with this Python, or run the client with the workers' (a run would fail with NoWorkerError)",
        )
    else:
        yield Check(
            "workers",
            WARN,
            f"none connected under prefix {cfg.queue_prefix!r} yet — start some (mqexec worker, or mqexec submit "
            "dirac); tasks wait in the queue until then",
        )
    if rows:
        yield _clocks(cfg, conn)


def _clocks(cfg: Config, conn: Connection) -> Check:
    """Compare the workers' clocks (the time in their heartbeat events) with ours."""
    from kombu import Consumer, Exchange, Queue

    skews: dict[str, float] = {}

    def on_message(body: Any, message: Any) -> None:
        if isinstance(body, dict) and "timestamp" in body:
            skews[str(body.get("hostname"))] = float(body["timestamp"]) - time.time()
        message.ack()

    channel = conn.channel()
    try:
        exchange = Exchange(f"{cfg.queue_prefix}.ev", type="topic")
        queue = Queue(
            f"{cfg.queue_prefix}.ev.doctor-{secrets.token_hex(4)}",
            exchange,
            routing_key="worker.heartbeat",
            exclusive=True,
            auto_delete=True,
        )
        with Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
            deadline = time.monotonic() + _HEARTBEAT_WAIT
            while time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=max(deadline - time.monotonic(), 0.01))
                except TimeoutError:
                    break
    except Exception as exc:
        return Check("clock", UNKNOWN, f"could not read the workers' heartbeats ({type(exc).__name__}: {exc})")
    finally:
        channel.close()
    if not skews:
        return Check("clock", UNKNOWN, f"no worker heartbeat within {_HEARTBEAT_WAIT:g} s to compare with")
    worst_name, worst = max(skews.items(), key=lambda kv: abs(kv[1]))
    text = f"largest difference {worst:+.1f} s ({worst_name}, {len(skews)} worker(s) compared)"
    if abs(worst) < _SKEW_WARN:
        return Check("clock", OK, text)
    mark = FAIL if abs(worst) >= _SKEW_FAIL else WARN
    return Check(
        "clock",
        mark,
        f"{text} — workers refuse signed commands (jobs kill) more than {_SKEW_FAIL:g} s off: run NTP on this "
        "machine (the broker's own clock is not visible over AMQP)",
    )


def _results(cfg: Config, size: int) -> Check:
    if size <= cfg.result_inline_limit or (size <= cfg.piece_size and not cfg.lake_url):
        return Check("results", OK, f"a result of {human_bytes(size)} travels in one message")
    if cfg.lake_url:
        return Check("results", OK, f"a result of {human_bytes(size)} goes to the lake {redact(cfg.lake_url)}")
    n = -(-size // cfg.piece_size)
    return Check(
        "results",
        WARN,
        f"a result of {human_bytes(size)} travels through the broker in {n} pieces of "
        f"{human_bytes(cfg.piece_size)} and is held whole in the client's memory — set MQEXEC_LAKE_URL for "
        "results this big",
    )


# ------------------------------------------------------------------------------------------------------- lake
def _lakes(cfg: Config) -> Iterator[Check]:
    urls = [("lake", cfg.lake_url)] if cfg.lake_url else []
    urls += [("cache", u.strip()) for u in (cfg.cache_url or "").split(",")[:1] if u.strip()]
    if not urls:
        yield Check("lake", OK, "none configured: results over 1 MiB travel through the broker in pieces")
        return
    grid = False
    for what, url in urls:
        yield _lake(what, url)
        grid = grid or (not url.startswith("file://") and "://" in url)
    if grid:
        yield from _grid_credentials()


def _lake(what: str, url: str) -> Check:
    from .lake import LakeError, open_lake

    data = secrets.token_bytes(64)
    rel = f"doctor/{socket.gethostname()}-{secrets.token_hex(4)}"
    step = "open"
    try:
        lake = open_lake(url)
        assert lake is not None
        step = "write"
        lake.write(rel, data)
        step = "read back"
        if lake.read(rel) != data:
            return Check(what, FAIL, f"{redact(url)}: what was written came back different")
        step = "delete"
        lake.remove(rel)
    except (LakeError, OSError) as exc:
        return Check(
            what, FAIL, f"{redact(str(exc))} ({step} of a probe object) — check the URL and the grid credentials"
        )
    return Check(what, OK, f"{redact(url)}: a probe object was written, read back and deleted")


def _grid_credentials() -> Iterator[Check]:
    from .lake_auth import bearer_token, x509_proxy

    token = bearer_token()
    if token is not None:
        left = _token_seconds(token)
        if left is None:
            yield Check("token", UNKNOWN, "a WLCG bearer token is set, but it is not a JWT: its lifetime is unknown")
        else:
            yield _lifetime("token", "WLCG bearer token", left, "get a new one (e.g. oidc-token)")
    proxy = x509_proxy()
    if proxy is not None:
        yield _certificate_file("X.509 proxy", proxy, "renew it (voms-proxy-init or dirac-proxy-init)")
    if token is None and proxy is None:
        yield Check("credentials", WARN, "no WLCG token and no X.509 proxy in the environment (BEARER_TOKEN*, "
                    "X509_USER_PROXY): the lake must accept this machine without them")  # fmt: skip


def _token_seconds(token: str) -> float | None:
    """Seconds until a JWT's ``exp`` (read, not verified: the storage verifies it); None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return float(claims["exp"]) - time.time()
    except (ValueError, KeyError, TypeError):
        return None


def _certificate_file(what: str, path: str, renew: str) -> Check:
    from cryptography import x509

    try:
        with open(path, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
    except (OSError, ValueError) as exc:
        return Check(what, FAIL, f"cannot read {path}: {exc}")
    return _lifetime(what, f"{what} {path}", cert.not_valid_after_utc.timestamp() - time.time(), renew)


def _lifetime(name: str, what: str, left: float, renew: str) -> Check:
    if left <= 0:
        return Check(name, FAIL, f"{what} expired {_span(-left)} ago — {renew}")
    if left < _CREDENTIAL_WARN:
        return Check(name, WARN, f"{what} expires in {_span(left)} — {renew} before a long run")
    return Check(name, OK, f"{what} valid {_span(left)}")


# -------------------------------------------------------------------------------------------------------- key
def _key(cfg: Config) -> Check:
    from .keys import Identity, Trust, default_key_file, read_private

    try:
        if cfg.identity:
            return Check(
                "key", OK, f"signing identity from MQEXEC_IDENTITY (key id {Identity.parse(cfg.identity).trust.key_id})"
            )
        if cfg.secret and not cfg.key_file:
            return Check("key", OK, f"worker token from MQEXEC_SECRET (trusts key id {Trust.parse(cfg.secret).key_id})")
        path = cfg.key_file or str(default_key_file())
        if not os.path.exists(path):
            return Check(
                "key",
                WARN,
                f"no signing key at {path} yet: the first client makes one (mode 0600); workers then need its "
                "token (mqexec key worker → MQEXEC_SECRET)",
            )
        me = Identity.parse(read_private(path, "signing key file"))
    except MQExecError as exc:
        return Check("key", FAIL, str(exc))
    mode = stat.S_IMODE(os.stat(path).st_mode)
    return Check("key", OK, f"{path} (mode {mode:04o}, key id {me.trust.key_id})")


# ------------------------------------------------------------------------------------------------- formatting
def _span(seconds: float) -> str:
    """``90`` → ``1 min 30 s``; ``200000`` → ``2 days``."""
    seconds = abs(seconds)
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.0f} s"


def main(args: argparse.Namespace) -> int:
    """``mqexec doctor``: print the checks as they finish; 1 if any blocks a run, else 0."""
    from .config import parse_duration

    cfg = Config.load(broker_url=args.broker)
    failed = 0
    for check in run_checks(cfg, result_size=args.result_size, chunk_time=parse_duration(args.chunk_time)):
        print(check, flush=True)
        failed += check.mark == FAIL
    print(f"{failed} problem(s) block a run" if failed else "nothing blocks a run")
    return 1 if failed else 0
