"""The embedded default: a broker and workers on this machine, with nothing to set up — one per process.

``Client()`` with no broker configured uses :func:`shared_cluster`: ``local_workers`` ``mqexec worker``
processes on kombu's file-system transport in a private temporary folder — the same worker, task body and
client code as on the grid; only the broker URL differs (``filesystem:///tmp/mqexec-…``). Every client of the
process with the same settings shares it (three ``MQExecutor()`` s → one set of workers); it stops when the
last of them closes, or at exit. The workers get the client's whole config (``Config.to_env``), a fresh
identity's verifying half, and the client's ``sys.path`` and working directory, so a processor in a module
beside the script imports there as it does here.

What the file transport lacks — a broker that hands a dead worker's unacknowledged messages to another — the
clients make up for: a worker that died is restarted, and each client sends again what that worker held or
what no worker had taken yet (results are deduplicated by key, so nothing counts twice).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict

from .config import Config
from .keys import Identity

log = logging.getLogger("mqexec.local")
_MAX_DEATHS = 10
_clusters: dict[str, LocalCluster] = {}
_lock = threading.Lock()


def shared_cluster(cfg: Config) -> LocalCluster:
    """The process's embedded cluster for these settings (started on first use); call ``release()`` when done."""
    worker_settings = {
        k: v for k, v in asdict(cfg).items() if k not in ("broker_url", "identity", "key_file", "secret")
    }
    key = json.dumps(worker_settings, sort_keys=True, default=str)
    with _lock:
        cluster = _clusters.get(key)
        if cluster is None or cluster.closed:
            cluster = _clusters[key] = LocalCluster(cfg)
        cluster.users += 1
        return cluster


class LocalCluster:
    """Local worker processes on a private file-system broker (see the module docstring)."""

    def __init__(self, cfg: Config) -> None:
        self.directory = tempfile.mkdtemp(prefix="mqexec-")
        self.identity = Identity.new()
        self.url = f"filesystem://{self.directory}"
        self.worker_config = cfg.replace(broker_url=self.url, identity=self.identity.text()).for_worker(
            cache_dir=os.path.join(self.directory, "cache")
        )
        self.users = 0
        self.closed = False
        self.deaths: list[str] = []  #: names of workers that died, in order (each client follows its own index)
        self._lock = threading.Lock()
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = [self._start(i) for i in range(cfg.local_workers)]
        atexit.register(self.close)
        log.info(
            "embedded default: %d local worker(s) x %d processes on %s", cfg.local_workers, cfg.concurrency, self.url
        )

    def client_config(self, cfg: Config) -> Config:
        """A client's config on this cluster: its broker and identity."""
        return cfg.replace(broker_url=self.url, identity=self.identity.text(), key_file="", secret="")

    def _start(self, index: int) -> tuple[str, subprocess.Popen[bytes]]:
        name = f"local{index}-{os.getpid()}-{len(self.deaths)}@{socket.gethostname()}"
        env = {**os.environ, **self.worker_config.to_env(), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [
            sys.executable,
            "-m",
            "mqexec",
            "worker",
            "--exit-with-parent",
            "--hostname",
            name,
            "--loglevel",
            os.environ.get("MQEXEC_LOCAL_LOGLEVEL", "WARNING"),
        ]
        # stdout carries only Celery's shutdown banners; the log is on stderr
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, cwd=os.getcwd())
        return name, proc

    def supervise(self) -> tuple[list[str], str | None]:
        """Restart local workers that died. Returns (the names of all workers that died so far, a reason to give
        up after ``_MAX_DEATHS`` deaths)."""
        with self._lock:
            for i, (name, proc) in enumerate(self._procs):
                code = proc.poll()
                if code is None or self.closed:
                    continue
                self.deaths.append(name)
                if len(self.deaths) >= _MAX_DEATHS:
                    return list(self.deaths), (
                        f"the embedded default's local worker exited with code {code} "
                        f"{len(self.deaths)} times (its log is above)"
                    )
                log.warning("local worker %s exited with code %s: restarting it", name, code)
                self._procs[i] = self._start(i)
            return list(self.deaths), None

    def release(self) -> None:
        """One client less; the last one stops the workers."""
        with _lock:
            self.users -= 1
            last = self.users <= 0
        if last:
            self.close()

    def close(self, grace: float = 1.0) -> None:
        """Stop the workers: cold shutdown (SIGQUIT), then SIGKILL to their process group after ``grace``
        seconds. The clients are gone, and so is the broker folder with what it held, so there is nothing a warm
        shutdown (~7 s of Celery tearing down its pool) would save."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        for _, proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT)
        deadline = time.monotonic() + grace
        for _, proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.01))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its pool processes
            proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def pids(self) -> list[int]:
        return [p.pid for _, p in self._procs]
