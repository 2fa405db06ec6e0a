"""The Celery app factory and the broker topology: which queues exist, with which guarantees.

Topology on RabbitMQ (created idempotently by whoever connects first — client or worker)::

    exchange "mqexec" (direct) ──▶ quorum queue  mqexec.py3.11         (tasks of Python 3.11 clients)
                               ──▶ quorum queue  mqexec.py3.11.GPU     (tasks that asked for resources={"GPU": 1})
      each task queue: durable, x-delivery-limit N, dead-letters to exchange "mqexec.dlx"
      (names start with the queue prefix, "mqexec" by default: MQEXEC_QUEUE_PREFIX keeps projects apart)
    exchange "mqexec.dlx" (headers) ──▶ the sending client's result queue  (match on header mqexec-reply)
                                    ──▶ classic queue mqexec.dead             (every dead letter, for people)
    classic queue mqexec.results.<session>   one per client session, durable, x-expires
    classic queue mqexec.blob.<sha256>       a function/scattered payload shipped once, read by every worker

The transport is chosen by the URL scheme, from a small table (``amqp``/``amqps``: RabbitMQ with all of the
above; ``filesystem``: the embedded default, kombu's file-system transport, without quorum queues — see
``docs/design.md``). Tasks travel as JSON (kombu never unpickles); the pickled payload is signed bytes inside.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .config import Config
from .errors import ConfigError

if TYPE_CHECKING:
    from celery import Celery
    from kombu import Queue

TASK_NAME = "mqexec.run"
REPLY_HEADER = "mqexec-reply"


@dataclass(frozen=True)
class Transport:
    """What a broker URL scheme can do; the rest of mqexec asks this instead of testing the scheme."""

    kombu_scheme: str
    quorum: bool  #: quorum queues + delivery limit + dead-lettering + consumer counts
    polling: bool  #: a virtual transport that polls (no server)


_TRANSPORTS = {
    "amqp": Transport("pyamqp", quorum=True, polling=False),
    "pyamqp": Transport("pyamqp", quorum=True, polling=False),
    "amqps": Transport("pyamqp", quorum=True, polling=False),
    "filesystem": Transport("mqfs", quorum=False, polling=True),
}


def transport_of(url: str) -> Transport:
    """The :class:`Transport` for a broker URL; a typo gets a "did you mean".

    >>> transport_of("amqp://guest:guest@127.0.0.1:5672//").quorum
    True
    """
    scheme = urlsplit(url).scheme
    if scheme in _TRANSPORTS:
        return _TRANSPORTS[scheme]
    near = difflib.get_close_matches(scheme, _TRANSPORTS, n=1)
    hint = f"; did you mean {near[0]}://?" if near else ""
    raise ConfigError(
        f"unknown broker scheme {scheme!r} in {redact(url)}{hint} (mqexec speaks {', '.join(sorted(_TRANSPORTS))})"
    )


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
    return url


def queue_name(cfg: Config, resource: str | None = None) -> str:
    """``mqexec.py3.11`` or, for a resource, ``mqexec.py3.11.GPU``."""
    base = f"{cfg.queue_prefix}.{cfg.env}"
    return f"{base}.{resource}" if resource else base


def task_queue(cfg: Config, resource: str | None = None) -> Queue:
    """The task queue for the config's environment (and resource), with the same arguments on both sides —
    RabbitMQ refuses a second declaration with different ones."""
    from kombu import Exchange, Queue

    name = queue_name(cfg, resource)
    args: dict[str, Any] = {}
    if transport_of(cfg.broker_url or "filesystem://").quorum:
        args = {
            "x-queue-type": "quorum",
            "x-delivery-limit": cfg.delivery_limit,
            "x-dead-letter-exchange": f"{cfg.queue_prefix}.dlx",
        }
    return Queue(
        name,
        Exchange(cfg.queue_prefix, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=args,
    )


def dead_letter_queues(cfg: Config, reply_to: str | None = None) -> list[Queue]:
    """The shared ``mqexec.dead`` queue, and (given a result queue name) that client's own binding."""
    from kombu import Exchange, Queue

    dlx = Exchange(f"{cfg.queue_prefix}.dlx", type="headers", durable=True)
    dead = Queue(
        f"{cfg.queue_prefix}.dead",
        dlx,
        durable=True,
        binding_arguments={"x-match": "all"},
        queue_arguments={"x-max-length": 10_000},
    )
    if reply_to is None:
        return [dead]
    mine = Queue(
        reply_to,
        dlx,
        durable=True,
        auto_delete=False,
        binding_arguments={"x-match": "all", REPLY_HEADER: reply_to},
        queue_arguments={"x-expires": int(cfg.results_expire * 1000)},
    )
    return [dead, mine]


def delete_topology(channel: Any, cfg: Config, resources: tuple[str, ...] = ()) -> None:
    """Delete a queue prefix's task queues, dead-letter queue and exchanges (after a test or benchmark run);
    result and blob queues go with their client's ``close()``."""
    for queue in [queue_name(cfg), *(queue_name(cfg, r) for r in resources), f"{cfg.queue_prefix}.dead"]:
        channel.queue_delete(queue)
    for exchange in (cfg.queue_prefix, f"{cfg.queue_prefix}.dlx"):
        channel.exchange_delete(exchange)


def kombu_connection_args(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(URL, transport options) as kombu wants them; ``filesystem:///dir`` becomes kombu's folders."""
    url = cfg.broker_url or ""
    transport = transport_of(url)
    if transport.kombu_scheme == "mqfs":
        from . import fstransport  # noqa: F401 - registers the mqfs:// transport with kombu

        root = Path(urlsplit(url).path or ".")
        folders = {
            "data_folder_in": str(root / "queue"),
            "data_folder_out": str(root / "queue"),
            "control_folder": str(root / "control"),
            "polling_interval": 0.01,
        }
        for d in ("queue", "control"):
            (root / d).mkdir(parents=True, exist_ok=True)
        return "mqfs://localhost/", folders
    if urlsplit(url).scheme == "amqp":
        url = "pyamqp" + url[len("amqp") :]
    return url, {"confirm_publish": True}


def make_app(cfg: Config, *, worker: bool = False) -> Celery:
    """A Celery app for this config. Workers register the task body; clients only send by name."""
    from celery import Celery

    url, transport_options = kombu_connection_args(cfg)
    app = Celery("mqexec", set_as_current=False)
    app.conf.update(
        broker_url=url,
        broker_transport_options=transport_options,
        broker_connection_timeout=cfg.connect_timeout,
        broker_heartbeat=cfg.heartbeat if worker else 0,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=True,
        # Flower learns of a task from the worker's task-received event; a client-side task-sent event would
        # be a second confirmed publish per task (it halved submit throughput, measured in docs/design.md).
        task_send_sent_event=False,
        task_create_missing_queues=False,
        task_queues=[task_queue(cfg)] + [task_queue(cfg, r) for r in sorted(cfg.resources)],
        task_default_queue=queue_name(cfg),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=False,
        event_queue_expires=60.0,
    )
    if worker:
        from .execute import register

        register(app, cfg)
    return app
