"""The time to the first worker: what ``mqexec submit dirac`` prints while its jobs start.

One line per step and job, timed from the submission, as it happens::

    job 4711001: Running at LCG.UKI-LT2-Brunel.uk, seen +41.2 s
    job 4711001: credentials handed out +43.0 s
    job 4711001: first task started on mqexec-py3.11-4711001@wn042 +44.1 s

DIRAC's status is seen at each poll; the credentials when the key service answers; the first task in the
event a worker sends when it takes its first task (``worker-first-task``, sent while task events are off), read
with the app's event receiver (so whatever exchange the app uses for events, this follows it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..config import Config
from .keys import job_of_hostname

if TYPE_CHECKING:
    from dirac_submit import JobInfo

log = logging.getLogger("mqexec.dirac")


class FirstWorkers:
    """Watches a run's jobs start; :meth:`start` (just before submitting) listens to worker events until :meth:`stop`.

    >>> watch = FirstWorkers(cfg)                     # doctest: +SKIP
    >>> watch.start(); workers = DiracWorkers(settings, on_credentials=watch.credentials)   # doctest: +SKIP
    >>> workers.scale(3); watch.jobs(ids); workers.wait(on_poll=watch.polled)               # doctest: +SKIP
    """

    def __init__(
        self, cfg: Config, *, say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cfg, self.say, self.clock = cfg, say, clock
        self.t0 = clock()
        self.running: dict[int, float] = {}  #: job → seconds after submission when DIRAC said Running
        self.booted: dict[int, float] = {}  #: job → seconds after submission when it got its credentials
        self.first_task: dict[int, float] = {}  #: job → seconds after submission when its first task started
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._listen, name="mqexec-dirac-events", daemon=True)
        self._listening = threading.Event()

    def jobs(self, ids: Sequence[int]) -> None:
        """These are the run's jobs (events of other workers on the broker are ignored)."""
        with self._lock:
            self._ids.update(ids)

    def polled(self, jobs: list[JobInfo]) -> None:
        """A status poll (``DiracWorkers.wait(on_poll=...)``): note each job seen Running for the first time."""
        for job in jobs:
            if job.status == "Running":
                self._note(self.running, job.job_id, f"Running at {job.site}, seen")

    def credentials(self, job: str) -> None:
        """The key service handed ``job`` its credentials (``KeyService(on_answer=...)``)."""
        if job.isdigit():
            self._note(self.booted, int(job), "credentials handed out")

    def _task_started(self, event: dict[str, Any]) -> None:
        hostname = str(event.get("hostname", ""))
        job = job_of_hostname(hostname)
        if job is not None and job in self._ids:
            self._note(self.first_task, job, f"first task started on {hostname}")

    def _note(self, table: dict[int, float], job: int, what: str) -> None:
        with self._lock:
            if job in table:
                return
            table[job] = self.clock() - self.t0
            self.say(f"job {job}: {what} +{table[job]:.1f} s")

    def summary(self) -> str | None:
        """``first task +3.0 s after submission (job N)``, or None when no task has run yet."""
        with self._lock:
            if not self.first_task:
                return None
            job, seconds = min(self.first_task.items(), key=lambda item: item[1])
        return f"the first task started +{seconds:.1f} s after submission (job {job})"

    # -- the workers' events ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the workers' events (returns once listening, or after 10 s if the broker is slow).

        Raises:
            BrokerError: the broker cannot be reached (said in seconds, before anything is submitted).
        """
        from ..broker import connect

        connect(self.cfg).release()
        self._thread.start()
        self._listening.wait(10)
        self.t0 = self.clock()  # what follows is the submission: times count from here

    def _listen(self) -> None:
        from ..app import FIRST_TASK_EVENT, make_app

        app = make_app(self.cfg)
        try:
            with app.connection_for_read() as conn:
                self._receiver = app.events.Receiver(conn, handlers={FIRST_TASK_EVENT: self._task_started})
                self._listening.set()
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except Exception as exc:  # the run goes on without first-task times
            log.warning("cannot follow the workers' events (no first-task times): %s", exc)
        finally:
            self._listening.set()

    def stop(self) -> None:
        """Stop listening."""
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread.is_alive():
            self._thread.join(5)
