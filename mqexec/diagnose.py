"""Why nothing happens: no worker serves this client's environment (and what the connected ones serve).

Run by the courier in a thread of its own when the client has calls on their way and heard nothing for
``no_worker_grace`` seconds: if a task queue of this client has no consumer, the connected workers of the same
queue prefix are asked what they serve (Celery's ``active_queues``; a full worker stops consuming for a while but
still lists its queues). Workers of another environment only → the
waiting calls fail with :class:`NoWorkerError` naming both sides. No worker at all → only a warning: grid
workers may still be queued at a site.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .broker import connect, redact
from .errors import NoWorkerError
from .topology import task_queue, task_queue_name
from .wire import PYTHON

if TYPE_CHECKING:
    from .config import Config
    from .ledger import Ledger

log = logging.getLogger("mqexec.client")


def no_worker(cfg: Config, ledger: Ledger, app: Any) -> None:
    """Fail the calls of task queues nobody consumes while only workers of other environments are connected."""
    if not cfg.transport.quorum:
        return
    resources = ledger.pending_resources()
    if not resources:
        return
    with connect(cfg) as conn:
        counts = {r: task_queue(cfg, r)(conn.channel()).queue_declare(passive=True)[2] for r in resources}
    idle = [r for r, n in counts.items() if n == 0]
    if not idle:
        return
    replies = app.control.inspect(timeout=1.0).active_queues() or {}
    ours = f"{cfg.queue_prefix}."
    served_by = {w: sorted(q["name"] for q in qs if q["name"].startswith(ours)) for w, qs in replies.items()}
    served = sorted({q for qs in served_by.values() for q in qs})
    idle = [r for r in idle if task_queue_name(cfg, r) not in served]  # served, but its workers are busy (full)
    if not idle:
        return
    names = ", ".join(task_queue_name(cfg, r) for r in idle)
    if not served:
        log.warning(
            "no worker is connected yet; tasks wait in %s (start one: mqexec worker --broker %s)",
            names,
            redact(cfg.broker_url or ""),
        )
        return
    error = NoWorkerError(
        f"no worker serves {names} (this client: Python {PYTHON}, env {cfg.env}); the "
        f"{sum(bool(q) for q in served_by.values())} connected worker(s) serve: {', '.join(served)}"
    )
    log.error("%s", error)
    ledger.fail_all(lambda c: c.message is not None and c.resource in idle, error)
