"""``DiracWorkers``: ``mqexec worker`` processes as DIRAC jobs, scaled by hand or by the task queue's depth.

The job template (what one job runs) and the transport (how to talk to DIRAC) are ``dirac_submit``'s; this class
only decides how many jobs there are, as dask-jobqueue's ``JobQueueCluster`` does over its ``Job``::

    DiracSettings ──▶ DiracWorkers ──▶ dirac_submit.JobPool(JobTemplate "mqexec dirac-boot worker …", Transport)
                          │                    └─ each accepted batch ─▶ state file (mqexec jobs)
                          ├─ KeyService (keys.py): hands each job its sealed worker_environment()
                          └─ close()/kill: DIRAC kills the jobs, halt_workers() stops their workers now
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import Config, parse_duration
from ..errors import BrokerError, ConfigError, MQExecError
from ..keys import Identity as SigningIdentity
from .keys import (
    BOOT_QUEUE_ENV,
    KeyService,
    StaticBootstrap,
    bootstrap_permissions,
    worker_environment,
)
from .sealing import Identity
from .state import config_record, state_path, update_state

if TYPE_CHECKING:
    from dirac_submit import JobInfo, JobPool, SecretIssuer, Transport

    from ..client import Client

log = logging.getLogger("mqexec.dirac")

TRANSPORTS = ("tornado", "diracx")


@dataclass(frozen=True)
class DiracSettings:
    """How and where :class:`DiracWorkers` runs its jobs; validated once, when made.

    >>> settings = DiracSettings(
    ...     "https://dirac.example.org:8443",
    ...     bootstrap=rabbitmq_bootstrap("https://broker.example.org:15671", admin=("admin", admin_pw)),
    ...     broker="amqps://me:pw@broker.example.org:5671/analysis",
    ...     sites=("LCG.UKI-LT2-Brunel.uk",), cores=8, walltime="24h", idle_timeout="10m",
    ... )                                                                    # doctest: +SKIP
    >>> DiracWorkers(settings).scale(20)                                     # doctest: +SKIP

    Args:
        url: DIRAC HTTPS (Tornado) server ``https://host:8443``, or DiracX ``https://host`` with
            ``transport="diracx"``.
        bootstrap: how jobs reach the key service: a standing low-privilege account's URL, or a callable
            ``(permissions, broker_url) -> SecretIssuer`` such as :func:`rabbitmq_bootstrap` (a user per run).
        broker: the broker URL the client and the workers use (default ``$MQEXEC_BROKER_URL``); it reaches the
            jobs only sealed.
        transport: ``"tornado"`` (DIRAC's HTTPS services) or ``"diracx"``.
        proxy: your X.509 proxy (default ``$X509_USER_PROXY``): authenticates to DIRAC and signs the sealed
            replies; needed for DiracX too.
        ca_dir: grid CA directory (default ``$X509_CERT_DIR``, ``/etc/grid-security/certificates``).
        dirac_setup: the DIRAC setup a v8 server files jobs under (``/DIRAC/Setup``); v9 has none.
        sites, cores, tags, image: where jobs run, ``NumberOfProcessors`` (= worker ``--concurrency``), JDL
            ``Tags``, and an Apptainer image (``apptainer exec --bind /cvmfs``).
        walltime, idle_timeout: the workers' ``--max-walltime`` and ``--idle-timeout`` (seconds, or "24h").
        identity: the run's signing identity (``mqexec.keys.Identity`` text; default: ``config``'s if it has one,
            else a fresh one for this run alone — its workers trust nothing else).
        config: other mqexec settings (e.g. ``Config.load(queue_prefix="ana")``).
        command: how the job starts mqexec (``("mqexec",)``; e.g. ``("python3", "-m", "mqexec")``).
        boot_timeout: how long a starting job waits for its credentials.
        max_parametric: jobs per submission (DIRAC's ``MaxParametricJobs``, 20 by default).
        state_file: where the run's job ids are kept for ``mqexec jobs``.
        name: ``JobName`` prefix.
    """

    url: str
    bootstrap: str | Callable[..., SecretIssuer]
    broker: str | None = None
    transport: str = "tornado"
    proxy: str | None = None
    ca_dir: str | None = None
    dirac_setup: str | None = None
    sites: Sequence[str] = ()
    cores: int = 1
    tags: Sequence[str] = ()
    image: str | None = None
    walltime: float | str | None = "24h"
    idle_timeout: float | str | None = "10m"
    identity: str | None = None
    config: Config | None = None
    command: Sequence[str] = ("mqexec",)
    boot_timeout: float = 900.0
    max_parametric: int = 20
    state_file: str | os.PathLike[str] | None = None
    name: str = "mqexec"

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("no DIRAC server: give its URL, e.g. https://dirac.example.org:8443")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"unknown DIRAC transport {self.transport!r}: use 'tornado' (DIRAC HTTPS) or 'diracx'")
        if not self.bootstrap:
            raise ConfigError(
                "DiracWorkers needs a bootstrap account for the jobs to fetch their sealed credentials with: "
                "bootstrap=rabbitmq_bootstrap(management_url, admin=(user, pw)) (a user per run) or "
                "bootstrap='amqps://boot:pw@host/vhost' (a standing account allowed only the permissions in "
                "docs/dirac.md)"
            )
        for name, at_least in (("cores", 1), ("max_parametric", 1)):
            if getattr(self, name) < at_least:
                raise ConfigError(f"{name} must be >= {at_least}, got {getattr(self, name)}")
        for name in ("sites", "tags", "command"):
            if isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a list of strings, not the string {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.command:
            raise ConfigError("command is empty: how does the job start mqexec, e.g. ('mqexec',)?")
        self.walltime_seconds, self.idle_seconds  # noqa: B018 - a malformed duration fails here, not later

    @property
    def walltime_seconds(self) -> float | None:
        """``walltime`` in seconds."""
        return parse_duration(self.walltime)

    @property
    def idle_seconds(self) -> float | None:
        """``idle_timeout`` in seconds."""
        return parse_duration(self.idle_timeout)


class DiracWorkers:
    """``mqexec worker`` processes as DIRAC jobs, scaled by hand or by the task queue's depth.

    >>> workers = DiracWorkers(DiracSettings(url, bootstrap=boot_url, broker=broker, cores=8))  # doctest: +SKIP
    >>> workers.scale(20)                  # or workers.adapt(minimum=0, maximum=100)           # doctest: +SKIP
    >>> with workers.client() as client:   # a Client that signs with this run's key           # doctest: +SKIP
    ...     client.map(process, chunks)
    >>> workers.close()                    # kills the jobs, stops their workers, deletes the boot user # doctest: +SKIP

    Raises:
        ConfigError: no RabbitMQ broker the grid can reach.
        dirac_submit.ProxyError, dirac_submit.CAError: the proxy or the CA directory is missing or expired.
    """

    def __init__(self, settings: DiracSettings, *, on_credentials: Callable[[str], None] | None = None) -> None:
        from dirac_submit import JobPool, JobTemplate, find_ca

        self.settings = s = settings
        base = s.config or Config.load()
        identity = s.identity or (
            base.identity if s.config is not None and base.identity else SigningIdentity.new().text()
        )
        self.cfg = cfg = base.replace(broker_url=s.broker or base.broker_url, identity=identity, secret="")
        if cfg.broker_url is None or not urlsplit(cfg.broker_url).scheme.startswith("amqp"):
            raise ConfigError(
                "DiracWorkers needs a RabbitMQ the grid can reach: pass broker='amqps://user:pw@host/"
                "vhost' or set MQEXEC_BROKER_URL"
            )
        self.run = f"{int(time.time()):x}{secrets.token_hex(3)}"
        self.boot_queue = f"{cfg.queue_prefix}.boot.{self.run}"
        self.proxy = s.proxy or os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"
        self.ca_dir = find_ca(s.ca_dir)
        self.me = Identity.load(self.proxy)
        self.state_file = Path(s.state_file) if s.state_file else state_path()
        self.template = JobTemplate(
            command=[*s.command, "dirac-boot", "--timeout", f"{s.boot_timeout:g}", *self._worker_args()],
            name=f"{s.name}-{self.run}",
            sites=list(s.sites),
            processors=s.cores,
            tags=list(s.tags),
            image=s.image,
            environment={BOOT_QUEUE_ENV: self.boot_queue, "MQEXEC_QUEUE_PREFIX": cfg.queue_prefix},
        )
        issuer = (
            StaticBootstrap(s.bootstrap)
            if isinstance(s.bootstrap, str)
            else s.bootstrap(bootstrap_permissions(self.boot_queue), cfg.broker_url)
        )
        self.pool: JobPool = JobPool(
            make_transport(s.url, s.transport, proxy=self.proxy, ca_dir=self.ca_dir, setup=s.dirac_setup),
            self.template,
            secrets=issuer,
            max_parametric=s.max_parametric,
            on_submit=self._record,
        )
        self.keys = KeyService(
            cfg,
            self.boot_queue,
            self.me,
            self.ca_dir,
            worker_environment(cfg),
            expires=max(s.walltime_seconds or 0, 86400.0),
            on_answer=on_credentials,
        )
        self._started = self._closed = False
        atexit.register(self.close)  # before the pool's own hook runs: the workers are stopped too

    def _worker_args(self) -> list[str]:
        args = ["worker", "--concurrency", str(self.settings.cores)]
        if (idle := self.settings.idle_seconds) is not None:
            args += ["--idle-timeout", f"{idle:g}"]
        if (walltime := self.settings.walltime_seconds) is not None:
            args += ["--max-walltime", f"{walltime:g}"]
        return args

    def _start(self) -> None:
        if self._closed:
            raise MQExecError("these DiracWorkers are closed")
        if not self._started:
            self.keys.start()
            self._started = True

    def _record(self, ids: list[int]) -> None:
        s = self.settings

        def add(state: dict[str, Any]) -> None:
            run = state.setdefault("runs", {}).setdefault(
                self.run,
                {
                    "url": s.url,
                    "transport": s.transport,
                    "proxy": self.proxy,
                    "ca_dir": self.ca_dir,
                    "setup": s.dirac_setup,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "mqexec": config_record(self.cfg),
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
        per = tasks_per_worker or 4 * self.settings.cores
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

    def wait(
        self,
        poll: float = 10.0,
        until: Callable[[], bool] | None = None,
        on_poll: Callable[[list[JobInfo]], None] | None = None,
    ) -> list[JobInfo]:
        """Block until every job is final (or ``until()`` is true), polling DIRAC every ``poll`` seconds; return
        the jobs as last seen. ``on_poll(jobs)`` sees each poll's result."""
        from dirac_submit import DiracError

        while True:
            try:
                jobs = self.jobs()
            except DiracError as exc:  # a DIRAC hiccup must not end the run
                log.warning("polling DIRAC failed: %s", exc)
                jobs = self.pool.jobs()
            if on_poll is not None:
                on_poll(jobs)
            if (jobs and all(j.final for j in jobs)) or (until is not None and until()):
                return jobs
            time.sleep(poll)

    def client(self, **settings: Any) -> Client:
        """A :class:`mqexec.Client` on this run's broker, queue prefix and signing key."""
        from ..client import Client

        settings = {"identity": self.cfg.identity, "queue_prefix": self.cfg.queue_prefix, **settings}
        return Client(self.cfg.broker_url, **settings)

    def close(self) -> None:
        """Kill the jobs still queued or running, stop their workers at once (:func:`halt_workers`), delete the
        bootstrap user, stop the key service. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        live = [j.job_id for j in self.pool.active()]
        try:
            self.pool.close()
        finally:
            if self._started:
                self.keys.stop()
        if live:
            halt_workers(self.cfg, live)

    def __enter__(self) -> DiracWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def halt_workers(cfg: Config, job_ids: Sequence[int], timeout: float = 5.0) -> list[str]:
    """Tell the workers of these DIRAC jobs, through the broker and as the owner, to stop taking tasks and exit
    after the one they run; return the names of those that confirmed.

    DIRAC's own kill reaches a running payload only at its watchdog's next heartbeat (up to 30 min), so without
    this the killed jobs' workers keep taking tasks. A broker that cannot be reached is logged, not raised: the
    jobs are killed in DIRAC either way.
    """
    from ..control import stop_workers

    try:
        return list(stop_workers(cfg, dirac_jobs=list(job_ids), timeout=timeout))
    except BrokerError as exc:
        log.warning("could not tell the killed jobs' workers to stop: %s", exc)
        return []


def make_transport(
    url: str,
    kind: str = "tornado",
    *,
    proxy: str | None = None,
    ca_dir: str | None = None,
    setup: str | None = None,
) -> Transport:
    """``TornadoTransport`` or ``DiracXTransport`` by name (``tornado``/``diracx``)."""
    from dirac_submit import DiracXTransport, TornadoTransport

    if kind == "tornado":
        return TornadoTransport(url, proxy=proxy, ca_dir=ca_dir, setup=setup)
    if kind == "diracx":
        return DiracXTransport(url, ca=ca_dir or True)
    raise ConfigError(f"unknown DIRAC transport {kind!r}: use 'tornado' (DIRAC HTTPS) or 'diracx'")


def queue_depth(cfg: Config) -> int:
    """Messages waiting in ``queue_name(cfg)`` (passive declare, as ``mqexec status`` does)."""
    from ..app import task_queue
    from ..broker import connect

    with connect(cfg) as conn:
        try:
            _, depth, _ = task_queue(cfg)(conn.channel()).queue_declare(passive=True)
        except Exception as exc:  # NOT_FOUND: nobody declared it yet
            if "NOT_FOUND" in str(exc) or getattr(exc, "code", None) == 404:
                return 0
            raise
    return int(depth)
