"""Grid-job behaviour of a worker, as one watcher thread in the worker's main process.

- **idle exit** (``--idle-timeout``): no task received or running for that long → warm shutdown, exit 0,
  so the batch slot is freed instead of burnt.
- **walltime drain** (``--max-walltime``): at ``max_walltime - drain_margin`` stop taking tasks and finish
  the running ones (warm shutdown); if they still run 30 s before the limit, stop hard (cold shutdown): their
  leases lapse and their clients send them to another worker.
Both act through the same signals a person would send (SIGTERM warm, SIGQUIT cold), so Celery's own shutdown
path does the work (tasks taken but not started are handed back to their clients at once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .config import Config

log = logging.getLogger("mqexec.worker")


def _busy() -> bool:
    from celery.worker import state

    return bool(state.active_requests or state.reserved_requests)


def watch(cfg: Config, started: float, *, parent: int | None = None, tick: float = 0.5) -> threading.Thread | None:
    """Start the watcher thread (if the config asks for idle exit or a walltime, or the worker is to exit
    with its ``parent`` process — the embedded default's workers) and return it."""
    drain_at = cfg.drain_at()
    if cfg.idle_timeout is None and drain_at is None and parent is None:
        return None

    def run() -> None:
        last_busy = time.monotonic()
        draining = False
        while True:
            time.sleep(tick)
            now = time.monotonic()
            if parent is not None and os.getppid() != parent:
                log.info("the process that started this worker is gone: exiting")
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if _busy():
                last_busy = now
            elif cfg.idle_timeout is not None and now - last_busy >= cfg.idle_timeout and not draining:
                log.info("idle for %.0f s (--idle-timeout): exiting to free the slot", now - last_busy)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if drain_at is not None and not draining and now - started >= drain_at:
                log.info(
                    "walltime drain: %.0f s of %.0f s used, taking no more tasks, finishing the running ones",
                    now - started,
                    cfg.max_walltime,
                )
                draining = True
                os.kill(os.getpid(), signal.SIGTERM)
            if draining and cfg.max_walltime is not None and now - started >= max(cfg.max_walltime - 30, 0):
                log.warning(
                    "walltime nearly reached with tasks still running: stopping hard; the broker "
                    "gives them to another worker"
                )
                os.kill(os.getpid(), signal.SIGQUIT)
                return

    thread = threading.Thread(target=run, name="mqexec-grid-watch", daemon=True)
    thread.start()
    return thread
