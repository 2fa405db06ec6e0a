"""The run's key service (next to the submitter) and the in-job boot that asks it for credentials.

::

   submitter (DiracWorkers / `mqexec submit dirac`)           grid worker node (DIRAC job)
   ┌──────────────────────────────┐                      ┌──────────────────────────────────────────┐
   │ KeyService thread            │   hello: proxy chain │ boot(): mqexec dirac-boot worker -c 8    │
   │  consumes <prefix>.boot.<run>│ ◀─── (boot account) ─│  reads $X509_USER_PROXY (delegated proxy) │
   │  checks: chain → same DN as  │                      │  checks: reply signed by the same DN     │
   │  my proxy, CA in X509_CERT_DIR│ ── reply: sealed    │  unseals with the proxy's private key    │
   │  seals worker_environment()  │   + signed ────────▶ │  exec mqexec worker (those variables in  │
   │  to the proxy's key          │                      │  its environment, never on argv)         │
   └──────────────────────────────┘                      └──────────────────────────────────────────┘

The JDL carries only the *bootstrap* broker account (``$MQEXEC_BOOT_URL``), which may publish a hello and read its
own reply queue and nothing else (:func:`bootstrap_permissions`); :func:`worker_environment` is the one place that
decides what key material reaches a worker. A DIRAC job finds its id in ``$JOBID`` (DIRAC v9's JobWrapper) or
``$DIRACJOBID`` (v8's); the booted worker gets both, and a hostname with the id in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ..config import Config, default_env
from .sealing import BootError, Identity, answer_hello, open_reply

if TYPE_CHECKING:
    from dirac_submit import SecretIssuer

log = logging.getLogger("mqexec.dirac")

BOOT_URL_ENV = "MQEXEC_BOOT_URL"  #: bootstrap broker URL in the job (public: it can only ask for credentials)
BOOT_QUEUE_ENV = "MQEXEC_BOOT_QUEUE"  #: the run's key-service queue
JOB_ID_ENVS = ("JOBID", "DIRACJOBID")  #: where DIRAC's JobWrapper puts the job id: v9, then v8
_HOSTNAME = re.compile(r"^mqexec-[^@]*-(\d+)@")


def worker_environment(cfg: Config) -> dict[str, str]:
    """The environment variables the key service hands each job's worker, sealed: the one place that decides
    which key material travels to the grid (nothing of it is in any JDL or request). The worker gets the run's
    whole config (``MQEXEC_CONFIG``) with the identity's verifying half only: it can check tasks and sign
    results, never sign a task.

    >>> from mqexec.keys import Identity
    >>> env = worker_environment(Config.load(broker_url="amqp://u:p@h//", identity=Identity.new().text()))
    >>> sorted(env), "mqxk1" in env["MQEXEC_CONFIG"]
    (['MQEXEC_CONFIG'], False)
    """
    return cfg.for_worker().to_env(portable=True)


def dirac_job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """This DIRAC job's id, from ``$JOBID`` (v9) or ``$DIRACJOBID`` (v8); None outside a job."""
    return next((environ[name] for name in JOB_ID_ENVS if environ.get(name)), None)


def worker_hostname(job_id: str, node: str) -> str:
    """``mqexec-py3.11-<job id>@<node>``: several jobs on one node get distinct worker names."""
    return f"mqexec-{default_env()}-{job_id}@{node}"


def job_of_hostname(hostname: str) -> int | None:
    """The DIRAC job id in a :func:`worker_hostname`, else None."""
    match = _HOSTNAME.match(hostname)
    return int(match.group(1)) if match else None


def boot_exchange(boot_queue: str) -> Any:
    """The run's boot exchange (direct, named as its boot queue): hellos go to the boot queue, replies to each
    job's reply queue, both by queue name."""
    from kombu import Exchange

    return Exchange(boot_queue, type="direct", durable=True)


def bootstrap_permissions(boot_queue: str) -> dict[str, str]:
    """RabbitMQ permission regexes of the bootstrap account: declare its own reply queue and bind it to the run's
    boot exchange (named as the boot queue), publish a hello there, read the reply. Nothing else: no default
    exchange, so the account (its URL is in the JDL) can put nothing into any other queue of the vhost.

    >>> bootstrap_permissions("mqexec.boot.1a2b")["write"]
    '^(mqexec\\\\.boot\\\\.1a2b|mqexec\\\\.boot\\\\.1a2b\\\\.[0-9a-f]{32})$'
    """
    run = re.escape(boot_queue)
    mine = run + r"\.[0-9a-f]{32}"
    return {"configure": f"^{mine}$", "write": f"^({run}|{mine})$", "read": f"^({run}|{mine})$"}


class StaticBootstrap:
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

    >>> DiracWorkers(DiracSettings(url, broker=broker, bootstrap=rabbitmq_bootstrap("https://broker:15671",
    ...                                                                             ("adm", pw))))  # doctest: +SKIP

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
        path = parts.path
        return RabbitMQUserIssuer(
            management_url,
            admin=admin,
            amqp_url=amqp_url or f"{parts.scheme}://{netloc}/{{vhost}}",
            vhost=vhost or (unquote(path[1:]) if len(path) > 1 else "/"),
            configure=permissions["configure"],
            write=permissions["write"],
            read=permissions["read"],
            env_name=BOOT_URL_ENV,
            prefix="mqexec-boot",
            verify=verify,
        )

    return make


class KeyService:
    """Answers the hellos of a run's jobs (a thread; polls its queue with ``basic.get``).

    >>> env = worker_environment(cfg)                                                   # doctest: +SKIP
    >>> service = KeyService(cfg, "mqexec.boot.1a2b", Identity.load(), ca_dir, env)     # doctest: +SKIP
    >>> service.start(); ...; service.stop()                                           # doctest: +SKIP

    ``on_answer(job_id)`` is called for each job that got its credentials; ``refusals`` keeps why hellos were
    refused (newest last).
    """

    def __init__(
        self,
        cfg: Config,
        queue: str,
        me: Identity,
        ca_dir: str,
        environment: Mapping[str, str],
        *,
        poll: float = 0.2,
        expires: float = 86400.0,
        on_answer: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg, self.queue, self.me, self.ca_dir = cfg, queue, me, ca_dir
        self.environment = dict(environment)
        self.poll, self.expires, self.on_answer = poll, expires, on_answer
        self.answered = self.refused = 0
        self.refusals: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqexec-dirac-keys", daemon=True)

    def _queue(self) -> Any:
        from kombu import Queue

        return Queue(
            self.queue,
            boot_exchange(self.queue),
            routing_key=self.queue,
            durable=True,
            auto_delete=False,
            queue_arguments={"x-expires": int(self.expires * 1000)},
        )

    def start(self) -> None:
        """Declare the run's boot queue (before any job can say hello) and start answering."""
        from ..broker import connect

        with connect(self.cfg) as conn:
            self._queue()(conn.default_channel).declare()
        self._thread.start()

    def _run(self) -> None:
        from kombu import Producer

        from ..broker import connect

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
        job = str(hello.get("job", "?")) if isinstance(hello, dict) else "?"
        try:
            if not isinstance(hello, dict) or not re.fullmatch(
                rf"{re.escape(self.queue)}\.[0-9a-f]{{32}}", str(hello.get("reply_to", ""))
            ):
                raise BootError("malformed hello")
            reply = answer_hello(hello, self.me, self.ca_dir, self.environment)
            self.answered += 1
            log.info("key service: sealed credentials for job %s", job)
        except (BootError, KeyError, TypeError, ValueError) as exc:
            self.refused += 1
            self.refusals.append(f"job {job}: {exc}")
            log.warning("key service: refused a hello from job %s: %s", job, exc)
            if not isinstance(hello, dict) or "reply_to" not in hello:
                return
            reply = {"v": 1, "error": str(exc)}
        producer.publish(reply, exchange=self.queue, routing_key=str(hello["reply_to"]), serializer="json", retry=False)
        if "error" not in reply and self.on_answer is not None:
            self.on_answer(job)

    def stop(self) -> None:
        """Stop answering and delete the boot queue."""
        from ..broker import connect

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        with contextlib.suppress(Exception), connect(self.cfg) as conn:
            conn.default_channel.queue_delete(self.queue)
            conn.default_channel.exchange_delete(self.queue)


def boot(*, timeout: float = 900.0, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """In the job: say hello over the bootstrap account, wait for the sealed reply, return the worker's env.

    ``$MQEXEC_BOOT_URL`` / ``$MQEXEC_BOOT_QUEUE`` come from the JDL; ``$X509_USER_PROXY`` (the delegated
    proxy), ``$X509_CERT_DIR`` and ``$JOBID``/``$DIRACJOBID`` from the job's node.
    """
    from kombu import Producer, Queue

    from ..broker import connect

    try:
        url, queue = environ[BOOT_URL_ENV], environ[BOOT_QUEUE_ENV]
    except KeyError as exc:
        raise BootError(
            f"${exc.args[0]} is not set: this command runs inside a job submitted by DiracWorkers"
        ) from None
    me = Identity.load(environ.get("X509_USER_PROXY"))
    ca_dir = environ.get("X509_CERT_DIR", "/etc/grid-security/certificates")
    nonce = secrets.token_hex(16)
    reply_to = f"{queue}.{nonce}"
    job = dirac_job_id(environ)
    hello = {"v": 1, "job": job or "?", "nonce": nonce, "reply_to": reply_to, "chain": me.pems()}
    with connect(Config.load(broker_url=url)) as conn:
        channel = conn.channel()
        mine = Queue(reply_to, boot_exchange(queue), routing_key=reply_to, exclusive=True, auto_delete=True)(channel)
        mine.queue_declare()
        mine.queue_bind()  # the run's boot exchange exists: the key service declared it before submitting
        Producer(channel).publish(hello, exchange=queue, routing_key=queue, serializer="json", retry=False)
        deadline = time.monotonic() + timeout
        while (message := mine.get(no_ack=True, accept=["json"])) is None:
            if time.monotonic() > deadline:
                raise BootError(
                    f"no credentials from the submitter within {timeout:g} s: is the DiracWorkers "
                    "(or `mqexec submit dirac`) that submitted this job still running?"
                )
            time.sleep(0.5)
    env = {k: v for k, v in environ.items() if k != BOOT_URL_ENV}
    env.update(open_reply(message.payload, me, ca_dir, nonce))
    if job is not None:
        env.update(dict.fromkeys(JOB_ID_ENVS, job))
    return env
