"""The broker objects of one queue prefix: which queues and exchanges exist, with which guarantees.

Created idempotently by whoever connects first (client or worker), all named after the prefix ("mqexec" by
default; ``MQEXEC_QUEUE_PREFIX`` keeps analyses apart)::

    exchange  P (direct) ──▶ quorum queue  P.py3.11        tasks of Python 3.11 clients
                         ──▶ quorum queue  P.py3.11.GPU    tasks that asked for resources={"GPU": 1}
                         ──▶ every results and blob queue below, by its own name (nothing of mqexec's goes through
                             the default exchange, so a broker account needs write on P's names only)
        task queues: x-delivery-limit 20 (a backstop: workers acknowledge on receipt, tasks are leased)
        and dead-letter to exchange P.dlx
    exchange  P.dlx (headers) ──▶ the sending client's result queue (matched on header mqexec-reply)
                              ──▶ classic queue P.dead     (every dead letter, for people; bounded)
    queue          P.results.<session>   one per client session: results, leases, dead letters (x-expires);
                                         a quorum queue when the broker URL lists a cluster's nodes
    classic queue  P.blob.<sha256>[.<i>] a function / argument / scattered value shipped once (x-expires)
    exchange  P.pidbox, P.ev            Celery remote control and events (Flower), per prefix

On the embedded default's file transport the same names exist without quorum queues, dead-lettering or expiry.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kombu import Exchange, Queue

    from .config import Config

TASK_NAME = "mqexec.run"
REPLY_HEADER = "mqexec-reply"  #: header naming the sender's result queue (routes its dead letters home)
BROKER_DELIVERY_LIMIT = 20  #: the broker drops a task message returned unacknowledged this often


def task_queue_name(cfg: Config, resource: str | None = None) -> str:
    """``mqexec.py3.11`` or, for a resource, ``mqexec.py3.11.GPU``."""
    base = f"{cfg.queue_prefix}.{cfg.env}"
    return f"{base}.{resource}" if resource else base


def task_queue(cfg: Config, resource: str | None = None) -> Queue:
    """The task queue for the config's environment (and resource), declared with the same arguments by every
    side — RabbitMQ refuses a second declaration with different ones."""
    from kombu import Queue

    name = task_queue_name(cfg, resource)
    args: dict[str, Any] = {}
    if cfg.transport.quorum:
        args = {
            "x-queue-type": "quorum",
            "x-delivery-limit": BROKER_DELIVERY_LIMIT,
            "x-dead-letter-exchange": f"{cfg.queue_prefix}.dlx",
        }
    return Queue(name, exchange(cfg), routing_key=name, durable=True, queue_arguments=args)


def results_queue_name(cfg: Config, session: str) -> str:
    return f"{cfg.queue_prefix}.results.{session}"


def exchange(cfg: Config) -> Exchange:
    """The prefix's direct exchange: tasks, results, leases and blobs are published to it, by queue name."""
    from kombu import Exchange

    return Exchange(cfg.queue_prefix, type="direct", durable=True)


def results_queue(cfg: Config, session: str) -> Queue:
    """A client session's queue for results, leases and its own dead letters; replicated (quorum) when the client
    was given a cluster (``Config.results_replicated``), so a node may fail; deleted by the broker
    ``session_expire`` after the client is gone."""
    from kombu import Exchange, Queue, binding

    name = results_queue_name(cfg, session)
    if not cfg.transport.quorum:
        return Queue(name, exchange(cfg), routing_key=name, durable=True)
    dlx = Exchange(f"{cfg.queue_prefix}.dlx", type="headers", durable=True)
    bindings = [
        binding(exchange(cfg), routing_key=name),
        binding(dlx, arguments={"x-match": "all", REPLY_HEADER: name}),
    ]
    return Queue(
        name,
        bindings=bindings,
        durable=True,
        queue_arguments={"x-queue-type": "quorum", "x-expires": int(cfg.session_expire * 1000)},
    )


def dead_queue(cfg: Config) -> Queue:
    """``P.dead``: a bounded copy of every dead letter of the prefix, for people to look at."""
    from kombu import Exchange, Queue

    dlx = Exchange(f"{cfg.queue_prefix}.dlx", type="headers", durable=True)
    return Queue(
        f"{cfg.queue_prefix}.dead",
        dlx,
        durable=True,
        binding_arguments={"x-match": "all"},
        queue_arguments={"x-max-length": 10_000},
    )


def declare_dead_queue(conn: Any, cfg: Config) -> str:
    """Declare ``P.dead`` on a channel of its own; returns why it could not be, or "". It is a classic queue, on
    one node of a cluster: while that node is down, dead letters reach only their senders, and nothing else stops."""
    channel = conn.channel()
    try:
        dead_queue(cfg)(channel).declare()
    except conn.channel_errors as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            channel.close()
    return ""


def blob_queue_name(cfg: Config, digest: str, part: int | None = None) -> str:
    """``P.blob.<sha256>`` (one message), or ``P.blob.<sha256>.<i>`` for piece ``i`` of a big one."""
    base = f"{cfg.queue_prefix}.blob.{digest}"
    return base if part is None else f"{base}.{part}"


def blob_queue_names(cfg: Config, digest: str, parts: int) -> list[str]:
    """The queues of blob ``digest``: one (``parts`` 0: a single message), or one per piece."""
    return [blob_queue_name(cfg, digest)] if not parts else [blob_queue_name(cfg, digest, i) for i in range(parts)]


def blob_queue(cfg: Config, name: str) -> Queue:
    """A blob queue: classic (a quorum queue counts every read as a delivery and RabbitMQ 4 drops a message after
    20), expiring with its client's session."""
    from kombu import Queue

    args = {"x-expires": int(cfg.session_expire * 1000)} if cfg.transport.quorum else {}
    return Queue(name, exchange(cfg), routing_key=name, durable=True, queue_arguments=args)


def delete_topology(channel: Any, cfg: Config, resources: tuple[str, ...] = ()) -> None:
    """Delete a queue prefix's task queues, dead-letter queue and exchanges (after a test or benchmark run);
    result and blob queues go with their client's ``close()``."""
    queues = [task_queue_name(cfg), *(task_queue_name(cfg, r) for r in resources), f"{cfg.queue_prefix}.dead"]
    for queue in queues:
        channel.queue_delete(queue)
    for exchange in (cfg.queue_prefix, f"{cfg.queue_prefix}.dlx"):
        channel.exchange_delete(exchange)
