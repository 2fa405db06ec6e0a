"""mqexec workers as DIRAC jobs: the ``mqexec worker`` payload, queue-depth demand, and sealed credentials.

    from mqexec import DiracWorkers
    workers = DiracWorkers("https://dirac.example.org:8443", broker="amqps://me:pw@broker.example.org:5671/v",
                           bootstrap=rabbitmq_bootstrap("https://broker.example.org:15671", admin=("adm", pw)),
                           sites=["LCG.UKI-LT2-Brunel.uk"], cores=8, walltime="24h", idle_timeout="10m",
                           image="docker://registry/mqexec-worker:py3.11")
    workers.scale(jobs=20)                 # or workers.adapt(minimum=0, maximum=100): follows the task queue
    with workers.client() as client:       # a Client that signs with this run's key
        client.map(process, chunks)
    workers.jobs()                         # [JobInfo(job_id, status, minor_status, site, since, ...)]
    workers.close()                        # kills what is still queued or running, deletes the boot user

No secret goes into the JDL (site and VO admins can read JDLs). The JDL carries only a *bootstrap* broker
account that can do nothing but ask for credentials; the real broker URL and the task-signing key are handed
to each job sealed to the job's own delegated X.509 proxy, by a key service running next to the submitter::

   submitter (DiracWorkers / `mqexec submit dirac`)           grid worker node (DIRAC job)
   ┌──────────────────────────────┐                      ┌──────────────────────────────────────────┐
   │ key service thread           │   hello: proxy chain │ mqexec dirac-boot worker --concurrency 8 │
   │  consumes <prefix>.boot.<run>│ ◀─── (boot account) ─│  reads $X509_USER_PROXY (delegated proxy) │
   │  checks: chain → same DN as  │                      │  checks: reply signed by the same DN     │
   │  my proxy, CA in X509_CERT_DIR│ ── reply: {broker,  │  unseals with the proxy's private key    │
   │  seals to the proxy's key,   │   secret} sealed +   │  exec mqexec worker (URL and key in its  │
   │  signs with my proxy key     │   signed ──────────▶ │  environment, never on argv)             │
   └──────────────────────────────┘                      └──────────────────────────────────────────┘

``mqexec submit dirac`` / ``mqexec jobs`` / ``mqexec jobs kill --all``: :func:`register_cli`; the jobs of
every run are remembered in ``$XDG_STATE_HOME/mqexec/dirac-jobs.json`` (default ``~/.local/state``).
This module imports ``dirac_submit``, ``requests`` and ``cryptography`` only when used.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .config import Config, default_env, parse_duration
from .errors import ConfigError, MQExecError

if TYPE_CHECKING:
    from dirac_submit import JobInfo, SecretIssuer, Transport

    from .client import Client

log = logging.getLogger("mqexec.dirac")

BOOT_URL_ENV = "MQEXEC_BOOT_URL"  #: bootstrap broker URL in the job (public: it can only ask for credentials)
BOOT_QUEUE_ENV = "MQEXEC_BOOT_QUEUE"  #: the run's key-service queue
_PROXY_OIDS = ("1.3.6.1.5.5.7.1.14", "1.3.6.1.4.1.3536.1.222")  # ProxyCertInfo: RFC 3820 and its GSI draft
_KDF_INFO = b"mqexec-dirac-boot-v1"


class BootError(MQExecError):
    """A job could not get its sealed credentials, or a hello/reply failed a check."""


# -- sealed delivery: X.509 chains, sealing to a public key, signing ----------------------------------------


class Identity:
    """A proxy file: its certificate chain (proxy first) and private key.

    >>> me = Identity.load("/tmp/x509up_u1000")          # doctest: +SKIP
    >>> me.user.subject.rfc4514_string()                 # doctest: +SKIP
    'CN=alice,O=mqexec-test'
    """

    def __init__(self, chain: list[Any], key: Any) -> None:
        self.chain, self.key = chain, key

    @classmethod
    def load(cls, path: str | None = None) -> Identity:
        """Read ``path`` (default ``$X509_USER_PROXY``, then ``/tmp/x509up_u<uid>``)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        where = path or os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"
        try:
            data = Path(where).read_bytes()
        except OSError as exc:
            raise BootError(f"cannot read the X.509 proxy {where}: {exc.strerror}") from None
        block = re.search(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----", data, re.DOTALL)
        if block is None:
            raise BootError(f"the proxy file {where} holds no private key")
        chain = x509.load_pem_x509_certificates(data)
        return cls(chain, serialization.load_pem_private_key(block.group(0), password=None))

    @property
    def user(self) -> Any:
        """The end-entity (non-proxy) certificate: the person."""
        return _end_entity(self.chain)

    def pems(self) -> list[str]:
        from cryptography.hazmat.primitives import serialization

        return [c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain]


def _is_proxy(cert: Any) -> bool:
    from cryptography.x509.oid import NameOID

    if any(ext.oid.dotted_string in _PROXY_OIDS for ext in cert.extensions):
        return True
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(cns) and cns[-1].value in ("proxy", "limited proxy")  # legacy Globus proxies


def _end_entity(chain: list[Any]) -> Any:
    for cert in chain:
        if not _is_proxy(cert):
            return cert
    raise BootError("the certificate chain has no end-entity (user) certificate")


def verify_chain(pems: Sequence[str], user: Any, ca_dir: str) -> Any:
    """Check a proxy chain presented by the other side; return its leaf certificate.

    Every proxy must be signed by the next certificate and be within its validity period, the end-entity
    certificate must have the same subject as ``user`` (our own) and be issued by a CA in ``ca_dir``.
    """
    from cryptography import x509

    try:
        chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    except (ValueError, TypeError, AttributeError) as exc:
        raise BootError(f"unreadable certificate chain: {exc}") from None
    if not chain:
        raise BootError("empty certificate chain")
    now = datetime.now(UTC)
    for i, cert in enumerate(chain):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise BootError(f"certificate {cert.subject.rfc4514_string()} is not valid now")
        if not _is_proxy(cert):
            break
        if i + 1 == len(chain):
            raise BootError("proxy chain ends without the user's certificate")
        try:
            cert.verify_directly_issued_by(chain[i + 1])
        except Exception as exc:  # InvalidSignature, or a name/key-type mismatch (ValueError, TypeError)
            raise BootError(
                f"proxy {cert.subject.rfc4514_string()} is not signed by the next certificate: "
                f"{exc or type(exc).__name__}"
            ) from None
    ee = _end_entity(chain)
    if ee.subject != user.subject:
        raise BootError(f"chain belongs to {ee.subject.rfc4514_string()}, not to {user.subject.rfc4514_string()}")
    for ca in _cas(ca_dir):
        if ca.subject == ee.issuer and ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
            try:
                ee.verify_directly_issued_by(ca)
                return chain[0]
            except Exception:  # another CA with the same name; keep looking
                continue
    raise BootError(f"no CA in {ca_dir} issued {ee.subject.rfc4514_string()}")


_CA_CACHE: dict[str, list[Any]] = {}


def _cas(ca_dir: str) -> list[Any]:
    from cryptography import x509

    if ca_dir not in _CA_CACHE:
        files = [Path(ca_dir)] if os.path.isfile(ca_dir) else sorted(Path(ca_dir).glob("*"))
        found = []
        for path in files:
            if path.suffix in (".pem", ".crt") or re.fullmatch(r"[0-9a-f]{8}\.\d+", path.name):
                with contextlib.suppress(OSError, ValueError):
                    found += x509.load_pem_x509_certificates(path.read_bytes())
        _CA_CACHE[ca_dir] = found
    return _CA_CACHE[ca_dir]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal(public_key: Any, plaintext: bytes, aad: bytes) -> dict[str, str]:
    """Encrypt for the holder of ``public_key`` (RSA: OAEP-wrapped key; EC: ephemeral ECDH) with AES-256-GCM."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    if isinstance(public_key, rsa.RSAPublicKey):
        key = AESGCM.generate_key(256)
        wrapped = public_key.encrypt(key, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        alg = "rsa-oaep"
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        ephemeral = ec.generate_private_key(public_key.curve)
        shared = ephemeral.exchange(ec.ECDH(), public_key)
        key = HKDF(hashes.SHA256(), 32, None, _KDF_INFO).derive(shared)
        wrapped = ephemeral.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        alg = "ecdh"
    else:
        raise BootError(f"cannot seal to a {type(public_key).__name__}")
    iv = secrets.token_bytes(12)
    return {"alg": alg, "key": _b64(wrapped), "iv": _b64(iv), "ct": _b64(AESGCM(key).encrypt(iv, plaintext, aad))}


def unseal(private_key: Any, sealed: Mapping[str, str], aad: bytes) -> bytes:
    """Undo :func:`seal` with the matching private key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    wrapped = base64.b64decode(sealed["key"])
    if sealed["alg"] == "rsa-oaep":
        key = private_key.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
    else:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, wrapped)
        key = HKDF(hashes.SHA256(), 32, None, _KDF_INFO).derive(private_key.exchange(ec.ECDH(), peer))
    return AESGCM(key).decrypt(base64.b64decode(sealed["iv"]), base64.b64decode(sealed["ct"]), aad)


def _sign(private_key: Any, data: bytes) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(private_key, rsa.RSAPrivateKey):
        return _b64(
            private_key.sign(data, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH), hashes.SHA256())
        )
    return _b64(private_key.sign(data, ec.ECDSA(hashes.SHA256())))


def _verify_signature(public_key: Any, data: bytes, signature: str) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(
                base64.b64decode(signature),
                data,
                padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                hashes.SHA256(),
            )
        else:
            public_key.verify(base64.b64decode(signature), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise BootError(f"the reply's signature does not verify ({type(exc).__name__})") from None


def _signed_part(nonce: str, sealed: Mapping[str, str]) -> bytes:
    return json.dumps({"nonce": nonce, "sealed": dict(sealed)}, sort_keys=True).encode()


def answer_hello(hello: Mapping[str, Any], me: Identity, ca_dir: str, payload: Mapping[str, str]) -> dict[str, Any]:
    """The key service's reply to one hello: ``payload`` sealed to the hello's proxy and signed by ``me``.

    Raises:
        BootError: the hello's chain is not a valid proxy of the same person as ``me``.
    """
    nonce = str(hello["nonce"])
    leaf = verify_chain(hello["chain"], me.user, ca_dir)
    sealed = seal(leaf.public_key(), json.dumps(dict(payload)).encode(), nonce.encode())
    return {"v": 1, "chain": me.pems(), "sealed": sealed, "sig": _sign(me.key, _signed_part(nonce, sealed))}


def open_reply(reply: Mapping[str, Any], me: Identity, ca_dir: str, nonce: str) -> dict[str, str]:
    """Check a reply (signed by a proxy of the same person as ``me``) and unseal it."""
    if "error" in reply:
        raise BootError(f"the key service refused: {reply['error']}")
    leaf = verify_chain(reply["chain"], me.user, ca_dir)
    _verify_signature(leaf.public_key(), _signed_part(nonce, reply["sealed"]), reply["sig"])
    try:
        return dict(json.loads(unseal(me.key, reply["sealed"], nonce.encode())))
    except Exception as exc:
        raise BootError(f"cannot unseal the reply with this job's proxy key ({type(exc).__name__})") from None


class KeyService:
    """Answers the hellos of a run's jobs (a thread; polls its queue with ``basic.get``).

    >>> service = KeyService(cfg, "mqexec.boot.1a2b", Identity.load(), ca_dir, payload)   # doctest: +SKIP
    >>> service.start(); ...; service.stop()                                           # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: Config,
        queue: str,
        me: Identity,
        ca_dir: str,
        payload: Mapping[str, str],
        poll: float = 0.2,
        expires: float = 86400.0,
    ) -> None:
        self.cfg, self.queue, self.me, self.ca_dir, self.payload = cfg, queue, me, ca_dir, dict(payload)
        self.poll, self.expires = poll, expires
        self.answered = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqexec-dirac-keys", daemon=True)

    def _queue(self) -> Any:
        from kombu import Queue

        return Queue(
            self.queue, durable=True, auto_delete=False, queue_arguments={"x-expires": int(self.expires * 1000)}
        )

    def start(self) -> None:
        """Declare the run's boot queue (before any job can say hello) and start answering."""
        from .broker import connect

        with connect(self.cfg) as conn:
            self._queue()(conn.default_channel).declare()
        self._thread.start()

    def _run(self) -> None:
        from kombu import Producer

        from .broker import connect

        while not self._stop.is_set():
            try:
                with connect(self.cfg) as conn:
                    channel = conn.channel()
                    queue, producer = self._queue()(channel), Producer(channel)
                    while not self._stop.is_set():
                        message = queue.get(no_ack=False, accept=["json"])
                        if message is None:
                            self._stop.wait(self.poll)
                            continue
                        self._handle(message.payload, producer)
                        message.ack()
            except Exception:  # the broker went away: log, retry; jobs wait for their reply
                log.exception("key service: lost the broker, reconnecting")
                self._stop.wait(2.0)

    def _handle(self, hello: Any, producer: Any) -> None:
        try:
            if not isinstance(hello, dict) or not re.fullmatch(
                rf"{re.escape(self.queue)}\.[0-9a-f]{{32}}", str(hello.get("reply_to", ""))
            ):
                raise BootError("malformed hello")
            reply = answer_hello(hello, self.me, self.ca_dir, self.payload)
            self.answered += 1
            log.info("key service: sealed credentials for job %s", hello.get("job", "?"))
        except (BootError, KeyError, TypeError, ValueError) as exc:
            self.refused += 1
            log.warning(
                "key service: refused a hello from job %s: %s",
                hello.get("job", "?") if isinstance(hello, dict) else "?",
                exc,
            )
            if not isinstance(hello, dict) or "reply_to" not in hello:
                return
            reply = {"v": 1, "error": str(exc)}
        producer.publish(reply, exchange="", routing_key=str(hello["reply_to"]), serializer="json", retry=False)

    def stop(self) -> None:
        """Stop answering and delete the boot queue."""
        from .broker import connect

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with contextlib.suppress(Exception), connect(self.cfg) as conn:
            conn.default_channel.queue_delete(self.queue)


def boot(argv: Sequence[str], *, timeout: float = 900.0) -> dict[str, str]:
    """In the job: say hello over the bootstrap account, wait for the sealed reply, return the worker's env.

    ``$MQEXEC_BOOT_URL`` / ``$MQEXEC_BOOT_QUEUE`` come from the JDL; ``$X509_USER_PROXY`` (the delegated
    proxy) and ``$X509_CERT_DIR`` from the job's node.
    """
    from kombu import Producer, Queue

    from .broker import connect

    try:
        url, queue = os.environ[BOOT_URL_ENV], os.environ[BOOT_QUEUE_ENV]
    except KeyError as exc:
        raise BootError(
            f"${exc.args[0]} is not set: this command runs inside a job submitted by DiracWorkers"
        ) from None
    me = Identity.load()
    ca_dir = os.environ.get("X509_CERT_DIR", "/etc/grid-security/certificates")
    nonce = secrets.token_hex(16)
    reply_to = f"{queue}.{nonce}"
    hello = {"v": 1, "job": os.environ.get("DIRACJOBID", "?"), "nonce": nonce, "reply_to": reply_to, "chain": me.pems()}
    with connect(Config.load(broker_url=url)) as conn:
        channel = conn.channel()
        mine = Queue(reply_to, exclusive=True, auto_delete=True)(channel)
        mine.declare()
        Producer(channel).publish(hello, exchange="", routing_key=queue, serializer="json", retry=False)
        deadline = time.monotonic() + timeout
        while (message := mine.get(no_ack=True, accept=["json"])) is None:
            if time.monotonic() > deadline:
                raise BootError(
                    f"no credentials from the submitter within {timeout:g} s: is the DiracWorkers "
                    "(or `mqexec submit dirac`) that submitted this job still running?"
                )
            time.sleep(0.5)
    secret = open_reply(message.payload, me, ca_dir, nonce)
    env = {k: v for k, v in os.environ.items() if k != BOOT_URL_ENV}
    env.update(MQEXEC_BROKER_URL=secret["broker_url"], MQEXEC_SECRET=secret["secret"])
    if secret.get("queue_prefix"):
        env["MQEXEC_QUEUE_PREFIX"] = secret["queue_prefix"]
    return env


# -- the pool of workers ----------------------------------------------------------------------------------


class _StaticBootstrap:
    """A standing bootstrap account (its URL is public by design: it may only ask for credentials)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def issue(self) -> Mapping[str, str]:
        return {BOOT_URL_ENV: self.url}

    def revoke(self) -> None:
        pass


def rabbitmq_bootstrap(
    management_url: str,
    admin: tuple[str, str],
    *,
    amqp_url: str | None = None,
    vhost: str | None = None,
    verify: str | bool = True,
) -> Callable[..., SecretIssuer]:
    """A per-run bootstrap user, made through RabbitMQ's management API (deleted on close).

    >>> DiracWorkers(url, broker=broker, bootstrap=rabbitmq_bootstrap("https://broker:15671", ("adm", pw)))
    ... # doctest: +SKIP

    Args:
        management_url: ``http(s)://host:15672``.
        admin: a user with the ``administrator`` tag; it never leaves this machine.
        amqp_url: ``amqps://host:5671/{vhost}`` for the jobs (default: the broker URL without credentials).
        vhost: default: the broker URL's.
    """

    def make(permissions: Mapping[str, str], broker_url: str) -> SecretIssuer:
        from dirac_submit import RabbitMQUserIssuer

        parts = urlsplit(broker_url)
        host = parts.hostname or "localhost"
        netloc = f"{host}:{parts.port}" if parts.port else host
        return RabbitMQUserIssuer(
            management_url,
            admin=admin,
            amqp_url=amqp_url or f"{parts.scheme}://{netloc}/{{vhost}}",
            vhost=vhost or _vhost(broker_url),
            env_name=BOOT_URL_ENV,
            prefix="mqexec-boot",
            verify=verify,
            **permissions,
        )

    return make


def _vhost(url: str) -> str:
    from urllib.parse import unquote

    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


class _RecordingPool:
    """Builds a :class:`dirac_submit.JobPool` whose submissions are written to the state file."""

    @staticmethod
    def make(
        transport: Transport,
        template: Any,
        secrets_: SecretIssuer,
        on_submit: Callable[[list[int]], None],
    ) -> Any:
        from dirac_submit import JobPool

        class Pool(JobPool):
            def submit(self, count: int) -> list[int]:
                ids = super().submit(count)
                on_submit(ids)
                return ids

        return Pool(transport, template, secrets=secrets_)


class DiracWorkers:
    """``mqexec worker`` processes as DIRAC jobs, scaled by hand or by the task queue's depth.

    Args:
        url: DIRAC HTTPS (Tornado) server ``https://host:8443``, or DiracX ``https://host`` with
            ``transport="diracx"``.
        broker: the broker URL the client and the workers use (default ``$MQEXEC_BROKER_URL``); it reaches the
            jobs only sealed.
        bootstrap: how jobs reach the key service: a standing low-privilege account's URL, or a callable
            ``(permissions, broker_url) -> SecretIssuer`` such as :func:`rabbitmq_bootstrap` (a user per run).
        proxy: your X.509 proxy (default ``$X509_USER_PROXY``): authenticates to DIRAC and signs the sealed
            replies; needed for DiracX too.
        ca_dir: grid CA directory (default ``$X509_CERT_DIR``, ``/etc/grid-security/certificates``).
        sites, cores, tags, image: where jobs run, ``NumberOfProcessors`` (= worker ``--concurrency``), JDL
            ``Tags``, and an Apptainer image (``apptainer exec --bind /cvmfs``).
        walltime, idle_timeout: the workers' ``--max-walltime`` and ``--idle-timeout``.
        secret: task-signing key for this run (default: a fresh random one; use :meth:`client`).
        config: other mqexec settings (e.g. ``Config.load(queue_prefix="ana")``).
        command: how the job starts mqexec (``("mqexec",)``; e.g. ``("python3", "-m", "mqexec")``).
        boot_timeout: how long a starting job waits for its credentials.
        state_file: where the run's job ids are kept for ``mqexec jobs``.
    """

    def __init__(
        self,
        url: str,
        *,
        broker: str | None = None,
        bootstrap: str | Callable[..., SecretIssuer] | None = None,
        transport: str = "tornado",
        proxy: str | None = None,
        ca_dir: str | None = None,
        sites: Sequence[str] = (),
        cores: int = 1,
        tags: Sequence[str] = (),
        image: str | None = None,
        walltime: str | float = "24h",
        idle_timeout: str | float | None = "10m",
        secret: str | bytes | None = None,
        config: Config | None = None,
        command: Sequence[str] = ("mqexec",),
        boot_timeout: float = 900.0,
        state_file: str | os.PathLike[str] | None = None,
        name: str = "mqexec",
    ) -> None:
        from dirac_submit import JobTemplate, find_ca

        if secret is None:  # the configured key only when a config is given; else a key for this run alone
            secret = config.secret if config is not None and config.secret else secrets.token_hex(32)
        cfg = (config or Config.load()).replace(
            broker_url=broker or (config or Config.load()).broker_url, secret=secret
        )
        if cfg.broker_url is None or not urlsplit(cfg.broker_url).scheme.startswith("amqp"):
            raise ConfigError(
                "DiracWorkers needs a RabbitMQ the grid can reach: pass broker='amqps://user:pw@host/"
                "vhost' or set MQEXEC_BROKER_URL"
            )
        if bootstrap is None:
            raise ConfigError(
                "DiracWorkers needs a bootstrap account for the jobs to fetch their sealed "
                "credentials with: bootstrap=rabbitmq_bootstrap(management_url, admin=(user, pw)) "
                "(a user per run) or bootstrap='amqps://boot:pw@host/vhost' (a standing account "
                "allowed only the permissions in docs/dirac.md)"
            )
        self.cfg = cfg
        self.run = f"{int(time.time()):x}{secrets.token_hex(3)}"
        self.boot_queue = f"{cfg.queue_prefix}.boot.{self.run}"
        self.url, self.transport_name = url, transport
        self.proxy = proxy or os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"
        self.ca_dir = find_ca(ca_dir)
        self.me = Identity.load(self.proxy)
        self.state_file = Path(state_file) if state_file else state_path()
        self.cores = cores
        walltime_s = parse_duration(walltime)
        idle_s = parse_duration(idle_timeout)
        worker_args = ["worker", "--concurrency", str(cores)]
        if idle_s is not None:
            worker_args += ["--idle-timeout", f"{idle_s:g}"]
        if walltime_s is not None:
            worker_args += ["--max-walltime", f"{walltime_s:g}"]
        self.template = JobTemplate(
            command=[*command, "dirac-boot", "--timeout", f"{boot_timeout:g}", *worker_args],
            name=f"{name}-{self.run}",
            sites=list(sites),
            processors=cores,
            tags=list(tags),
            image=image,
            environment={BOOT_QUEUE_ENV: self.boot_queue, "MQEXEC_QUEUE_PREFIX": cfg.queue_prefix},
        )
        issuer = (
            _StaticBootstrap(bootstrap)
            if isinstance(bootstrap, str)
            else bootstrap(self.bootstrap_permissions(), cfg.broker_url)
        )
        self.pool = _RecordingPool.make(
            make_transport(url, transport, proxy=self.proxy, ca_dir=self.ca_dir), self.template, issuer, self._record
        )
        self.keys = KeyService(
            cfg,
            self.boot_queue,
            self.me,
            self.ca_dir,
            {"broker_url": cfg.broker_url, "secret": cfg.secret.decode(), "queue_prefix": cfg.queue_prefix},
            expires=max(walltime_s or 0, 86400.0),
        )
        self._started = False
        self._closed = False

    def bootstrap_permissions(self) -> dict[str, str]:
        """RabbitMQ permission regexes of the bootstrap account: publish a hello, read its own reply queue.

        >>> workers.bootstrap_permissions()["write"]          # doctest: +SKIP
        '^amq\\\\.default$'
        """
        mine = re.escape(self.boot_queue) + r"\.[0-9a-f]{32}"
        return {"configure": f"^{mine}$", "write": r"^amq\.default$", "read": f"^{mine}$"}

    def _start(self) -> None:
        if self._closed:
            raise MQExecError("these DiracWorkers are closed")
        if not self._started:
            self.keys.start()
            self._started = True

    def _record(self, ids: list[int]) -> None:
        def add(state: dict[str, Any]) -> None:
            run = state.setdefault("runs", {}).setdefault(
                self.run,
                {
                    "url": self.url,
                    "transport": self.transport_name,
                    "proxy": self.proxy,
                    "ca_dir": self.ca_dir,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "jobs": [],
                },
            )
            run["jobs"] = sorted(set(run["jobs"]) | set(ids))

        update_state(self.state_file, add)

    # -- scaling --------------------------------------------------------------------------------------------

    def scale(self, jobs: int) -> None:
        """Have exactly ``jobs`` jobs not yet final (submit more, or kill the surplus, pending ones first)."""
        self._start()
        self.pool.scale(jobs)

    def adapt(
        self,
        minimum: int = 0,
        maximum: int = 100,
        *,
        tasks_per_worker: int | None = None,
        interval: float = 10.0,
        cooldown: float = 60.0,
        stuck_after: float = 600.0,
    ) -> Any:
        """Follow the task queue: ``ceil(waiting tasks / tasks_per_worker)`` jobs within ``[minimum, maximum]``.

        ``tasks_per_worker`` defaults to ``4 * cores``. Returns the running ``dirac_submit.Adaptive``.
        """
        self._start()
        per = tasks_per_worker or 4 * self.cores
        return self.pool.adapt(
            minimum,
            maximum,
            demand=lambda: self.demand(per),
            interval=interval,
            cooldown=cooldown,
            stuck_after=stuck_after,
        )

    def queue_depth(self) -> int:
        """Tasks waiting in this environment's task queue (0 when it does not exist yet)."""
        return queue_depth(self.cfg)

    def demand(self, tasks_per_worker: int) -> int:
        """Jobs wanted for the current backlog (uncapped; :meth:`adapt` clamps it)."""
        return math.ceil(self.queue_depth() / max(tasks_per_worker, 1))

    # -- looking at and ending the run ------------------------------------------------------------------------

    def jobs(self) -> list[JobInfo]:
        """Poll DIRAC; every job of this run (``job_id, site, status, minor_status, since``), oldest first."""
        return self.pool.refresh()

    def wait(self, poll: float = 10.0, until: Callable[[], bool] | None = None) -> None:
        """Block until every job is final (or ``until()`` is true), polling DIRAC every ``poll`` seconds."""
        from dirac_submit import DiracError

        while not (until and until()):
            try:
                jobs = self.jobs()
            except DiracError as exc:  # a DIRAC hiccup must not end the run
                log.warning("polling DIRAC failed: %s", exc)
                jobs = self.pool.jobs()
            if jobs and all(j.final for j in jobs):
                return
            time.sleep(poll)

    def client(self, **settings: Any) -> Client:
        """A :class:`mqexec.Client` on this run's broker, queue prefix and signing key."""
        from .client import Client

        settings = {"secret": self.cfg.secret, "queue_prefix": self.cfg.queue_prefix, **settings}
        return Client(self.cfg.broker_url, **settings)

    def close(self) -> None:
        """Kill the jobs still queued or running, delete the bootstrap user, stop the key service. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.pool.close()
        finally:
            if self._started:
                self.keys.stop()

    def __enter__(self) -> DiracWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_transport(
    url: str,
    kind: str = "tornado",
    *,
    proxy: str | None = None,
    ca_dir: str | None = None,
) -> Transport:
    """``TornadoTransport`` or ``DiracXTransport`` by name (``tornado``/``diracx``)."""
    from dirac_submit import DiracXTransport, TornadoTransport

    if kind == "tornado":
        return TornadoTransport(url, proxy=proxy, ca_dir=ca_dir)
    if kind == "diracx":
        return DiracXTransport(url, ca=ca_dir or True)
    raise ConfigError(f"unknown DIRAC transport {kind!r}: use 'tornado' (DIRAC HTTPS) or 'diracx'")


def queue_depth(cfg: Config) -> int:
    """Messages waiting in ``queue_name(cfg)`` (passive declare, as ``mqexec status`` does)."""
    from .app import task_queue
    from .broker import connect

    with connect(cfg) as conn:
        try:
            _, depth, _ = task_queue(cfg)(conn.channel()).queue_declare(passive=True)
        except Exception as exc:  # NOT_FOUND: nobody declared it yet
            if "NOT_FOUND" in str(exc) or getattr(exc, "code", None) == 404:
                return 0
            raise
    return int(depth)


# -- which jobs are ours: the state file ----------------------------------------------------------------------


def state_path() -> Path:
    """``$XDG_STATE_HOME/mqexec/dirac-jobs.json`` (default ``~/.local/state/mqexec/dirac-jobs.json``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mqexec" / "dirac-jobs.json"


def read_state(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {"runs": {}}
    except (OSError, ValueError) as exc:
        raise MQExecError(f"cannot read the job list {path}: {exc}") from None


def update_state(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and write the state file under a lock (several runs may submit at once)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(path)
        change(state)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)


def _runs(path: Path) -> Iterator[tuple[str, dict[str, Any], Transport]]:
    for run, rec in sorted(read_state(path).get("runs", {}).items()):
        proxy = rec.get("proxy") if rec.get("proxy") and os.path.exists(rec["proxy"]) else None
        transport = make_transport(rec["url"], rec.get("transport", "tornado"), proxy=proxy, ca_dir=rec.get("ca_dir"))
        yield run, rec, transport


# -- the command line -----------------------------------------------------------------------------------------


def register_cli(subparsers: Any) -> None:
    """Add ``submit dirac``, ``jobs`` and the in-job ``dirac-boot`` to mqexec's command line."""
    submit = subparsers.add_parser("submit", help="start workers on a batch system")
    where = submit.add_subparsers(dest="system", required=True)
    d = where.add_parser(
        "dirac",
        help="mqexec workers as DIRAC jobs (stays in the foreground: it hands the jobs "
        "their sealed credentials; Ctrl-C kills them)",
    )
    d.add_argument("--jobs", type=int, required=True)
    d.add_argument("--url", default=os.environ.get("DIRAC_URL"), help="DIRAC server (default $DIRAC_URL)")
    d.add_argument("--transport", choices=["tornado", "diracx"], default="tornado")
    d.add_argument("--proxy", help="X.509 proxy (default $X509_USER_PROXY)")
    d.add_argument("--ca-dir", help="grid CA directory (default $X509_CERT_DIR)")
    d.add_argument("--site", default="", help="comma-separated DIRAC site names")
    d.add_argument("--tags", default="", help="comma-separated JDL Tags, e.g. GPU")
    d.add_argument("--cores", type=int, default=1)
    d.add_argument("--image", help="Apptainer image, e.g. docker://registry/mqexec-worker:py3.11")
    d.add_argument("--broker", help="broker URL (default $MQEXEC_BROKER_URL); reaches the jobs sealed only")
    d.add_argument("--walltime", default="24h")
    d.add_argument("--idle-timeout", default="10m")
    d.add_argument("--bootstrap", help="URL of a standing bootstrap account (see docs/dirac.md)")
    d.add_argument("--management-url", help="RabbitMQ management API: make a bootstrap user per run")
    d.add_argument(
        "--management-user",
        default="admin",
        help="its admin user; password from $MQEXEC_RABBITMQ_ADMIN_PASSWORD or a prompt",
    )
    d.add_argument("--queue-prefix")
    d.add_argument("--worker-command", default="mqexec", help="how jobs start mqexec, e.g. 'python3 -m mqexec'")
    d.add_argument("--poll", type=float, default=30.0, help="seconds between status polls")
    d.set_defaults(run=_cli_submit)

    jobs = subparsers.add_parser("jobs", help="the DIRAC jobs of your runs: id, site, status, minor status, since")
    jobs.add_argument("--state", help=argparse.SUPPRESS)
    action = jobs.add_subparsers(dest="action")
    kill = action.add_parser("kill", help="kill jobs: --all, or ids")
    kill.add_argument("ids", nargs="*", type=int)
    kill.add_argument("--all", action="store_true")
    action.add_parser("clean", help="forget runs whose jobs are all final")
    jobs.set_defaults(run=_cli_jobs)

    b = subparsers.add_parser("dirac-boot", help="(inside a DIRAC job) fetch sealed credentials, exec mqexec worker")
    b.add_argument("--timeout", type=float, default=900.0)
    b.add_argument("argv", nargs=argparse.REMAINDER, help="the mqexec command to exec, e.g. worker -c 8")
    b.set_defaults(run=_cli_boot)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _cli_submit(args: argparse.Namespace) -> int:
    import getpass
    import shlex
    import signal

    from .worker import setup_logging

    setup_logging("INFO")
    if not args.url:
        raise ConfigError("no DIRAC server: pass --url https://host:8443 or set DIRAC_URL")
    bootstrap: str | Callable[..., SecretIssuer] | None = args.bootstrap
    if bootstrap is None and args.management_url:
        password = os.environ.get("MQEXEC_RABBITMQ_ADMIN_PASSWORD") or getpass.getpass(
            f"RabbitMQ management password for {args.management_user}: "
        )
        bootstrap = rabbitmq_bootstrap(args.management_url, (args.management_user, password))
    cfg = Config.load(broker_url=args.broker, queue_prefix=args.queue_prefix).with_secret()
    workers = DiracWorkers(
        args.url,
        bootstrap=bootstrap,
        transport=args.transport,
        proxy=args.proxy,
        ca_dir=args.ca_dir,
        sites=_split(args.site),
        tags=_split(args.tags),
        cores=args.cores,
        image=args.image,
        walltime=args.walltime,
        idle_timeout=args.idle_timeout,
        config=cfg,
        command=shlex.split(args.worker_command),
    )

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        workers.scale(args.jobs)
        ids = [j.job_id for j in workers.pool.jobs()]
        print(
            f"run {workers.run}: submitted {len(ids)} job(s) {' '.join(map(str, ids))} to {args.url}; "
            "handing out their credentials until they end (Ctrl-C kills them; `mqexec jobs` shows them)",
            flush=True,
        )
        workers.wait(poll=args.poll)
        print(f"run {workers.run}: every job has ended", flush=True)
    except KeyboardInterrupt:
        print(f"run {workers.run}: killing the jobs", flush=True)
    finally:
        workers.close()
    return 0


def _fmt(when: Any) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if isinstance(when, datetime) else "-"


def _cli_jobs(args: argparse.Namespace) -> int:
    from dirac_submit import FINAL_STATUSES

    path = Path(args.state) if args.state else state_path()
    if args.action == "clean":
        done = []
        for run, rec, transport in _runs(path):
            states = transport.status(rec["jobs"])
            if all(s.status in FINAL_STATUSES for s in states.values()):
                done.append(run)
        update_state(path, lambda s: [s["runs"].pop(r, None) for r in done])
        print(f"forgot {len(done)} finished run(s)")
        return 0
    if args.action == "kill":
        if not args.all and not args.ids:
            raise ConfigError("say which jobs: mqexec jobs kill --all, or mqexec jobs kill ID [ID ...]")
        killed = 0
        for _run, rec, transport in _runs(path):
            states = transport.status(rec["jobs"])
            live = [i for i, s in states.items() if s.status not in FINAL_STATUSES and (args.all or i in args.ids)]
            if live:
                killed += len(transport.kill(live).done)
        print(f"killed {killed} job(s)")
        return 0
    rows = [("JOB ID", "SITE", "STATUS", "MINOR STATUS", "SINCE", "RUN")]
    for run, rec, transport in _runs(path):
        states = transport.status(rec["jobs"])
        for job_id in rec["jobs"]:
            s = states.get(job_id)
            rows.append(
                (
                    str(job_id),
                    s.site if s else "?",
                    s.status if s else "unknown to DIRAC",
                    s.minor_status if s else "",
                    _fmt(s.since if s else None),
                    run,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _cli_boot(args: argparse.Namespace) -> int:
    import socket

    argv = [a for a in args.argv if a != "--"]
    if not argv:
        raise ConfigError("dirac-boot needs the command to run, e.g. dirac-boot worker --concurrency 8")
    env = boot(argv, timeout=args.timeout)
    if argv[0] == "worker" and "--hostname" not in argv:  # several jobs on one node need distinct names
        argv += [
            "--hostname",
            f"mqexec-{default_env()}-{os.environ.get('DIRACJOBID', os.getpid())}@{socket.gethostname()}",
        ]
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mqexec", *argv], env)
    return 0  # not reached


__all__ = [
    "BootError",
    "DiracWorkers",
    "Identity",
    "KeyService",
    "queue_depth",
    "rabbitmq_bootstrap",
    "register_cli",
    "state_path",
]
