"""``mqexec worker``: a Celery worker that only ever connects out to the broker.

    broker ──(task queue P.py3.11 [+ resource queues], prefetch 1)──▶ main process: intake.Gate
       main process: checks and leases tasks (intake.py), AMQP heartbeats, signed remote control (Flower,
                     control.py), grid watcher (grid.py: idle exit, walltime drain, exit with the parent)
       └──▶ pool process (prefork): execute.py — unpickle, run, publish the result (publisher confirms)
    pool process ──(signed frames)──▶ the client's results queue   (big results: data lake, or pieces)

It listens on no port. The prefork pool is used even for ``--concurrency 1``: the main process keeps
heartbeating and renewing leases while a task runs. Celery's own connections get the same bound on every wait
for the broker as mqexec's (``broker.io_timeout``): after a silent loss, Celery closes its event connection
politely, and without a bound it would wait for the vanished broker's answer forever. Its remote-control queue is
not exclusive, so that a worker may reconnect before the broker has noticed that the old connection died.

    mqexec worker --broker amqps://user:pw@broker.example:5671/vhost --concurrency 8 \\
                  --idle-timeout 600 --max-walltime 47h
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from .broker import connect, io_timeout, redact
from .config import Config
from .errors import ConfigError

log = logging.getLogger("mqexec.worker")


def setup_logging(level: str = "INFO") -> None:
    """One line per event on stderr; Celery's own per-task lines are quietened (mqexec logs one per task)."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    for noisy in (
        "celery.app.trace",
        "celery.worker.strategy",
        "celery.worker.consumer.mingle",
        "celery.worker.consumer.connection",
        "kombu.mixins",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for logger in ("celery.app.trace", "celery.worker.request"):
        logging.getLogger(logger).addFilter(_not_calls_failed)


def _not_calls_failed(record: logging.LogRecord) -> bool:
    """Celery logs a failed task with its traceback; a task whose calls failed was logged in one line already
    (``execute.CallsFailed`` only tells Flower), so those records are dropped."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (type(exc).__name__ == "CallsFailed" or "CallsFailed" in record.getMessage())


def default_hostname(cfg: Config) -> str:
    """``mqexec-py3.11-<DIRAC job id or pid>@<node>``: unique per process, tied to its DIRAC job when there is one."""
    from .intake import dirac_job_id

    return f"mqexec-{cfg.env}-{dirac_job_id() or os.getpid()}@{socket.gethostname()}"


def run_worker(
    cfg: Config, *, hostname: str | None = None, loglevel: str = "INFO", exit_with_parent: bool = False
) -> int:
    """Run a worker until it is stopped, idles out or drains for its walltime; returns the exit code.

    Raises:
        ConfigError: no broker, or no key to trust tasks with.
        BrokerError: the broker cannot be reached (within seconds, naming the cause).
    """
    cfg.trust()  # no key: a ConfigError now, not a worker that trusts nothing
    if cfg.broker_url is None:
        raise ConfigError("no broker: pass --broker URL or set MQEXEC_BROKER_URL")
    setup_logging(loglevel)
    import warnings

    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)  # root is the norm in grid containers
    with connect(cfg) as conn:  # fail in seconds with a clear error, before Celery's retry loops
        if cfg.transport.quorum:
            from .topology import declare_dead_queue

            why = declare_dead_queue(conn, cfg)
            if why:
                log.warning("no dead-letter queue for people to look at: %s", why)
    from celery import signals

    from . import intake
    from .app import make_app
    from .grid import watch
    from .topology import task_queue_name

    app = make_app(cfg, worker=True)
    if cfg.transport.heartbeats:
        bound = io_timeout(cfg)
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "read_timeout": bound,
            "write_timeout": bound,
        }
        # a worker that reconnects before the broker has noticed its old connection die would find its exclusive
        # remote-control queue still locked by it (RESOURCE_LOCKED: Celery stops with "Unrecoverable error")
        app.conf.control_queue_exclusive = False
        warnings.filterwarnings("ignore", message="A node named .* is already using this process mailbox")
    queues = [task_queue_name(cfg)] + [task_queue_name(cfg, r) for r in sorted(cfg.resources)]
    name = hostname or default_hostname(cfg)
    started = time.monotonic()

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: object) -> None:
        log.info(
            "worker %s consuming %s from %s, concurrency %d%s%s",
            name,
            ", ".join(queues),
            redact(cfg.broker_url or ""),
            cfg.concurrency,
            f", idle timeout {cfg.idle_timeout:g} s" if cfg.idle_timeout is not None else "",
            f", drains at {cfg.drain_at():g} s" if cfg.max_walltime is not None else "",
        )
        watch(cfg, started, parent=os.getppid() if exit_with_parent else None)

    worker = app.Worker(
        hostname=name,
        pool="prefork",
        concurrency=cfg.concurrency,
        queues=queues,
        loglevel=loglevel,
        quiet=True,
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    worker.start()
    gate = intake.current_gate()
    code = (gate.exit_code if gate is not None else 0) or worker.exitcode or 0
    log.info("worker %s stopped (exit code %d)", name, code)
    return int(code)
