"""The embedded default: a broker and workers on this machine, with nothing to set up.

``Client()`` with no broker configured starts one ``mqexec worker`` process here (``concurrency`` pool
processes) on kombu's file-system transport in a private temporary folder — the same worker, the same task
body and the same client code as on the grid; only the broker URL differs (``filesystem:///tmp/mqexec-…``).
Why this transport and not a private RabbitMQ node: it needs only ``pip install``, starts in milliseconds,
and measured ~7,800 no-op tasks/s here (``docs/benchmarks.md``). What it lacks — a broker that hands a dead
worker's unacknowledged messages to another — the client makes up for: it restarts a dead local worker and
publishes again what was in flight (results are deduplicated by key, so nothing counts twice).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .config import Config

log = logging.getLogger("mqexec.local")


class LocalCluster:
    """Local worker processes on a private file-system broker; stopped by :meth:`close`.

    >>> cluster = LocalCluster(Config.load(), n_workers=1)     # doctest: +SKIP
    >>> cluster.config.broker_url                               # doctest: +SKIP
    'filesystem:///tmp/mqexec-1a2b3c'
    """

    def __init__(self, cfg: Config, n_workers: int = 1) -> None:
        self.directory = tempfile.mkdtemp(prefix="mqexec-")
        secret = cfg.secret or secrets.token_hex(32).encode()
        self.config = cfg.replace(broker_url=f"filesystem://{self.directory}", secret=secret)
        self._procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0
        for _ in range(n_workers):
            self._procs.append(self._start())
        log.info(
            "embedded default: %d local worker(s) x %d processes on %s",
            n_workers,
            self.config.concurrency,
            self.config.broker_url,
        )

    def _start(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "MQEXEC_SECRET": self.config.secret.decode(),
            "MQEXEC_CACHE_DIR": os.path.join(self.directory, "cache"),
        }
        cmd = [
            sys.executable,
            "-m",
            "mqexec",
            "worker",
            "--broker",
            self.config.broker_url or "",
            "--concurrency",
            str(self.config.concurrency),
            "--exit-with-parent",
            "--loglevel",
            os.environ.get("MQEXEC_LOCAL_LOGLEVEL", "WARNING"),
        ]
        # stdout carries only Celery's shutdown banners ("Hitting Ctrl+C again ..."); the log is on stderr
        return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)

    def supervise(self, max_restarts: int = 3) -> tuple[bool, str | None]:
        """Restart local workers that died. Returns (whether one was restarted, why none is left after
        ``max_restarts``); the client then republishes what the dead worker held."""
        restarted = False
        for i, proc in enumerate(self._procs):
            code = proc.poll()
            if code is None:
                continue
            if self.restarts >= max_restarts:
                return restarted, (
                    f"the embedded default's local worker exited with code {code} "
                    f"{self.restarts + 1} times (its log is above)"
                )
            log.warning("local worker exited with code %s: restarting it", code)
            self.restarts += 1
            self._procs[i] = self._start()
            restarted = True
        return restarted, None

    def close(self, grace: float = 1.0) -> None:
        """Stop the workers: cold shutdown (SIGQUIT), then SIGKILL to their process group after ``grace``
        seconds. The client is gone, and so is the broker folder with whatever it held, so there is nothing
        a warm shutdown (~7 s of Celery tearing down its pool here) would save."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
        deadline = time.monotonic() + grace
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.01))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its pool processes
            proc.wait()
        self._procs = []
        shutil.rmtree(self.directory, ignore_errors=True)
