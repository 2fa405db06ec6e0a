"""The Celery app of one queue prefix: the task message format, remote control and events (Flower).

Clients use it to build Celery task messages, to send signed control commands (``control.py``) and to watch
events; workers run it (``worker.py``). Everything is named after the queue prefix — remote control on exchange
``P.pidbox``, events on ``P.ev`` — so two analyses on one vhost never see each other's workers or commands.
Messages are JSON (kombu never unpickles); our own connections add publisher confirms where a message must not
be lost (results, tasks); Celery's events are best effort and go unconfirmed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .broker import split_urls, ssl_options
from .topology import TASK_NAME, task_queue, task_queue_name

if TYPE_CHECKING:
    from celery import Celery

    from .config import Config
    from .keys import Identity


def _broker_url(cfg: Config) -> str:
    urls = split_urls(cfg.broker_url or "")
    if cfg.transport.kombu_scheme == "mqfs":
        return "mqfs://localhost/"
    return ";".join("pyamqp" + u[u.index(":") :] for u in urls)


#: the worker event a worker sends when it takes its first task (task events are off until Flower asks for them;
#: ``mqexec submit dirac`` times the first worker of each job with it)
FIRST_TASK_EVENT = "worker-first-task"


def make_app(cfg: Config, *, worker: bool = False, owner: Identity | None = None) -> Celery:
    """A Celery app for this config.

    Args:
        worker: the app of an ``mqexec worker`` (registers the task body, uses mqexec's consumer).
        owner: the analyst's identity; control commands sent through this app are signed with it.
    """
    from celery import Celery

    transport_options: dict[str, Any] = {}
    if cfg.transport.kombu_scheme == "mqfs":
        from .fstransport import kombu_args

        transport_options = kombu_args(split_urls(cfg.broker_url or "")[0])[1]
    app = Celery("mqexec", set_as_current=False, control="mqexec.control:OwnerControl")
    app.conf.update(
        broker_url=_broker_url(cfg),
        broker_transport_options=transport_options,
        broker_use_ssl=ssl_options(cfg) or False,
        broker_login_method="EXTERNAL" if cfg.tls_cert else "AMQPLAIN",
        broker_connection_timeout=cfg.connect_timeout,
        broker_heartbeat=cfg.heartbeat if cfg.transport.heartbeats else 0,
        broker_connection_retry_on_startup=False,
        control_exchange=cfg.queue_prefix,
        event_exchange=f"{cfg.queue_prefix}.ev",
        event_queue_prefix=f"{cfg.queue_prefix}.ev",
        event_queue_expires=60.0,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,  # workers acknowledge on receipt and lease the task (intake.py)
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,  # no effect without acks_late; silences a warning
        worker_send_task_events=False,  # until Flower asks (its signed enable_events): 3 messages a task
        task_send_sent_event=False,  # Flower learns of a task from the worker's task-received event
        task_create_missing_queues=False,
        task_queues=[task_queue(cfg)] + [task_queue(cfg, r) for r in sorted(cfg.resources)],
        task_default_queue=task_queue_name(cfg),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.mqexec_config = cfg  # type: ignore[attr-defined]
    app.mqexec_owner = owner  # type: ignore[attr-defined]
    if worker:
        from .intake import Request

        app.conf.worker_consumer = "mqexec.intake:Consumer"
        app.task(name=TASK_NAME, bind=True, Request=Request, acks_late=False)(_run_task)
    return app


def _run_task(task: Any, wire: Any) -> None:
    """The body of every mqexec task message, in a worker's pool process (see ``execute.py``)."""
    from .execute import run

    run(task.app.mqexec_config, wire, task.request.hostname or "?")
