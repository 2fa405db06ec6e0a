"""Hand-made task messages for tests: what a misconfigured peer or an attacker on the vhost could publish."""

from __future__ import annotations

import time
import uuid
from typing import Any

import cloudpickle

from mqexec.config import Config
from mqexec.keys import Identity
from mqexec.topology import REPLY_HEADER, TASK_NAME, results_queue_name, task_queue
from mqexec.wire import PYTHON, Call, Ref, Task


def make_task(identity: Identity, cfg: Config, session: str, fn: Any, *args: Any, key: str = "forged-1",
              python: str = PYTHON, expires: float | None = None, nonce: str | None = None) -> Task:  # fmt: skip
    """A task of ``identity`` for ``session`` of ``cfg``'s prefix: ``fn(*args)``."""
    call = Call(key, f"{getattr(fn, '__name__', 'fn')}(...)", Ref.inline(cloudpickle.dumps((args, {}))))
    return Task(
        id=uuid.uuid4().hex,
        prefix=cfg.queue_prefix,
        session=session,
        key_id=identity.trust.key_id,
        nonce=nonce or uuid.uuid4().hex,
        expires=expires if expires is not None else time.time() + 3600,
        python=python,
        reply_to=results_queue_name(cfg, session),
        fn=Ref.inline(cloudpickle.dumps(fn)),
        calls=(call,),
    )


def publish(cfg: Config, wire: Any, task_id: str | None = None, reply_to: str = "nobody") -> None:
    """Publish ``wire`` as the argument of an ``mqexec.run`` Celery message into ``cfg``'s task queue."""
    from kombu import Connection, Producer

    from mqexec.app import make_app

    app = make_app(cfg)
    task_id = task_id or (wire.get("id") if isinstance(wire, dict) else None) or uuid.uuid4().hex
    message = app.amqp.as_task_v2(task_id, TASK_NAME, args=[wire], kwargs={})
    queue = task_queue(cfg)
    with Connection(cfg.broker_url.replace("amqp://", "pyamqp://", 1), connect_timeout=5) as conn:
        channel = conn.channel()
        queue(channel).declare()
        Producer(channel).publish(
            message.body,
            exchange=queue.exchange,
            routing_key=queue.routing_key,
            serializer="json",
            headers={**message.headers, REPLY_HEADER: reply_to},
            delivery_mode=2,
            **message.properties,
        )
