"""``mqexec worker``: a Celery worker that only ever connects out to the broker.

    broker ──(task queue mqexec.py3.11 [+ resource queues], prefetch 1 per pool process)──▶ main process
       main process: AMQP heartbeats, acks, remote control (Flower), grid watcher (idle exit, walltime drain)
       └──▶ pool process (prefork): execute.Executor — verify, unpickle, run, publish the result, then ack
    pool process ──(signed result, publisher confirm)──▶ client's result queue  (big results: data lake)

It listens on no port. The prefork pool is used even for ``--concurrency 1``: the main process keeps
heartbeating while a task runs (with the solo pool a long task starves heartbeats and gets delivered twice).

    mqexec worker --broker amqps://user:pw@broker.example:5671/vhost --concurrency 8 \\
                  --idle-timeout 600 --max-walltime 47h
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time

from .app import dead_letter_queues, make_app, queue_name, redact, transport_of
from .broker import connect
from .config import Config
from .errors import ConfigError

log = logging.getLogger("mqexec.worker")


def _consumer_class() -> type:
    from celery.worker.consumer import Consumer as CeleryConsumer

    class Consumer(CeleryConsumer):  # type: ignore[misc]
        """Celery's consumer without native delayed delivery: mqexec sends no countdown/ETA tasks, so the 27
        ``celery_delayed_*`` queues and their exchanges it would declare on the broker are clutter."""

        class Blueprint(CeleryConsumer.Blueprint):  # type: ignore[misc,name-defined]
            default_steps = [s for s in CeleryConsumer.Blueprint.default_steps if "delayed_delivery" not in s]

    return Consumer


def __getattr__(name: str) -> type:
    if name == "Consumer":  # looked up by Celery (worker_consumer) only inside the worker
        return _consumer_class()
    raise AttributeError(name)


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


def run_worker(
    cfg: Config, *, hostname: str | None = None, loglevel: str = "INFO", exit_with_parent: bool = False
) -> int:
    """Run a worker until it is stopped, idles out or drains for its walltime; returns the exit code."""
    if not cfg.secret:
        raise ConfigError(
            "this worker has no signing key, so it would trust no task: set MQEXEC_SECRET (or "
            "MQEXEC_SECRET_FILE) to the key the client signs with"
        )
    if cfg.broker_url is None:
        raise ConfigError("no broker: pass --broker URL or set MQEXEC_BROKER_URL")
    setup_logging(loglevel)
    import warnings

    from celery.exceptions import SecurityWarning

    warnings.filterwarnings("ignore", category=SecurityWarning)  # root is the norm in grid containers
    with connect(cfg) as conn:  # fail in seconds with a clear error, before Celery's retry loops
        if transport_of(cfg.broker_url).quorum:
            for q in dead_letter_queues(cfg):
                q(conn.default_channel).declare()
    app = make_app(cfg, worker=True)
    app.conf.worker_consumer = "mqexec.worker:Consumer"
    queues = [queue_name(cfg)] + [queue_name(cfg, r) for r in sorted(cfg.resources)]
    # unique per process: two jobs on one node must not share Celery's remote-control queue
    name = hostname or f"mqexec-{cfg.env}-{os.getpid()}@{socket.gethostname()}"
    started = time.monotonic()

    from celery import signals

    from .grid import watch

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
    code = worker.exitcode or 0
    log.info("worker %s stopped (exit code %d)", name, code)
    return int(code)
