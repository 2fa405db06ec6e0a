"""The embedded default: a broker and workers on this machine, with nothing to set up.

``Client()`` with no broker configured starts one ``mqexec worker`` process here (``concurrency`` pool
processes) on kombu's file-system transport in a private temporary folder — the same worker, the same task
body and the same client code as on the grid; only the broker URL differs (``filesystem:///tmp/mqexec-…``).
Why this transport and not a private RabbitMQ node: it needs only ``pip install``, starts in milliseconds,
and measured ~1,000 tasks/s here (``docs/design.md``). What it lacks (quorum queues' delivery limit) is
replaced for local runs by the client restarting a dead worker, and matters less with workers on the same
machine as the client.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

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
        log.info("embedded default: %d local worker(s) × %d processes on %s", n_workers,
                 self.config.concurrency, self.config.broker_url)

    def _start(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, "MQEXEC_SECRET": self.config.secret.decode(),
               "MQEXEC_CACHE_DIR": os.path.join(self.directory, "cache")}
        cmd = [sys.executable, "-m", "mqexec", "worker", "--broker", self.config.broker_url or "",
               "--concurrency", str(self.config.concurrency), "--exit-with-parent",
               "--loglevel", os.environ.get("MQEXEC_LOCAL_LOGLEVEL", "WARNING")]
        return subprocess.Popen(cmd, env=env, start_new_session=True)

    def supervise(self, max_restarts: int = 3) -> str | None:
        """Restart local workers that died; after ``max_restarts`` say why no worker is left (else None)."""
        for i, proc in enumerate(self._procs):
            code = proc.poll()
            if code is None:
                continue
            if self.restarts >= max_restarts:
                return (f"the embedded default's local worker exited with code {code} "
                        f"{self.restarts + 1} times (its log is above)")
            log.warning("local worker exited with code %s: restarting it", code)
            self.restarts += 1
            self._procs[i] = self._start()
        return None

    def close(self, timeout: float = 10.0) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        shutil.rmtree(self.directory, ignore_errors=True)
