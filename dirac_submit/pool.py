"""A pool of DIRAC jobs built from one template: submit, poll, scale, adapt, kill.

The template knows *what* a job runs (:class:`~dirac_submit.jdl.JobTemplate`), the transport *how*
to talk to DIRAC (:class:`~dirac_submit.transport.Transport`); the pool only counts and decides::

    with JobPool(TornadoTransport(url), JobTemplate(["mqexec", "worker"]),
                 secrets=issuer) as pool:          # close() kills what is left, also on Ctrl-C
        pool.scale(5)                              # exactly 5 jobs not yet final
        pool.adapt(0, 50, demand=lambda: queue_depth() // 10)
        for job in pool.refresh():
            print(job.job_id, job.site, job.status, job.minor_status, job.since)

Jobs go out as parametric descriptions of at most ``max_parametric`` jobs each (DIRAC's
``MaxParametricJobs``, 20 by default), so ``scale(25)`` is two requests. Jobs that are accepted but
never start (stuck in Waiting/Received/Checking) still count as active, and while any job is stuck
the pool does not grow: more jobs would only wait too.
An interpreter exit (``atexit``) closes every pool that is still open.
"""

from __future__ import annotations

import atexit
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from .credentials import SecretIssuer
from .errors import ServiceError
from .jdl import JobTemplate
from .transport import FINAL_STATUSES, PENDING_STATUSES, JobState, Transport

log = logging.getLogger(__name__)

MAX_PARAMETRIC_JOBS = 20  #: DIRAC's default MaxParametricJobs (JobManagerHandler.MAX_PARAMETRIC_JOBS)
EWMSJDL = 1501  #: DIRAC's "Invalid job description" errno
_LIMIT = re.compile(r"Number of parametric jobs exceeds the limit of (\d+)")


@dataclass(frozen=True)
class JobInfo:
    """A job of the pool, as last seen.

    Attributes:
        job_id: DIRAC job id.
        status: major status.
        minor_status: DIRAC's minor status.
        site: where it runs or is bound for.
        since: when it entered this status (server time if reported, else when the pool saw it), UTC.
        submitted: ``clock()`` value at submission, for ageing.
    """

    job_id: int
    status: str
    minor_status: str
    site: str
    since: datetime
    submitted: float

    @property
    def final(self) -> bool:
        """True once the job cannot run any more (Done, Failed, Killed, ...)."""
        return self.status in FINAL_STATUSES

    @property
    def pending(self) -> bool:
        """True while accepted but not started (Received, Checking, Waiting, ...)."""
        return self.status in PENDING_STATUSES


@dataclass(frozen=True)
class Decision:
    """What one adapt step saw and did (also logged)."""

    target: int
    active: int
    pending: int
    stuck: int
    submitted: int
    killed: int


class JobPool:
    """Jobs from one template on one transport.

    Args:
        transport: where to submit (Tornado or DiracX).
        template: what each job runs.
        secrets: issues short-lived credentials put in the jobs' environment, revoked on close.
        parametric: submit several jobs as parametric descriptions (one request per batch) instead of one by one.
        max_parametric: jobs per parametric description: DIRAC's ``MaxParametricJobs`` (20 unless the admin set
            another). A server that refuses a batch with a lower limit (``Errno 1501``, "Number of parametric
            jobs exceeds the limit of N") is answered with batches of N.
        delete_on_close: delete the jobs on close (their logs are then gone) instead of only killing them.
        on_submit: called with the ids of each batch as soon as DIRAC accepted it (e.g. to write them down).
        clock: monotonic time source (tests pass a fake one).
    """

    def __init__(
        self,
        transport: Transport,
        template: JobTemplate,
        *,
        secrets: SecretIssuer | None = None,
        parametric: bool = True,
        max_parametric: int = MAX_PARAMETRIC_JOBS,
        delete_on_close: bool = False,
        on_submit: Callable[[list[int]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_parametric < 1:
            raise ValueError(f"max_parametric must be >= 1, got {max_parametric}")
        self.transport = transport
        self.template = template
        self.secrets = secrets
        self.parametric = parametric
        self.max_parametric = max_parametric
        self.delete_on_close = delete_on_close
        self.on_submit = on_submit
        self.clock = clock
        self._jobs: dict[int, JobInfo] = {}
        self._lock = threading.RLock()
        self._secret_env: dict[str, str] | None = None
        self._adaptive: Adaptive | None = None
        self._closed = False
        atexit.register(self.close)

    # -- the jobs -------------------------------------------------------------------------------

    def submit(self, count: int) -> list[int]:
        """Submit ``count`` more jobs, in batches of at most ``max_parametric``; return their ids.

        Each batch is the pool's (and killed on :meth:`close`) as soon as DIRAC accepted it, also when a
        later batch fails.
        """
        if count <= 0:
            return []
        with self._lock:
            self._check_open()
            if self.secrets is not None and self._secret_env is None:
                self._secret_env = dict(self.secrets.issue())
            ids: list[int] = []
            while len(ids) < count:
                size = min(count - len(ids), self.max_parametric) if self.parametric else 1
                try:
                    batch = self.transport.submit([self.template.to_jdl(size, self._secret_env)])
                except ServiceError as err:
                    limit = _parametric_limit(err)
                    if limit is None or size <= max(limit, 1):
                        raise
                    log.info("the server allows %d parametric jobs per submission; submitting in batches", limit)
                    self.max_parametric = max(limit, 1)
                    continue
                self._add(batch)
                ids += batch
            return ids

    def _add(self, ids: list[int]) -> None:
        now, tick = datetime.now(UTC), self.clock()
        for job_id in ids:
            self._jobs[job_id] = JobInfo(job_id, "Received", "submitted", "", now, tick)
        log.info("submitted %d job(s): %s", len(ids), ids)
        if self.on_submit is not None:
            self.on_submit(ids)

    def refresh(self) -> list[JobInfo]:
        """Poll the server for every job not yet final; return all jobs (see :meth:`jobs`)."""
        with self._lock:
            live = [j.job_id for j in self._jobs.values() if not j.final]
            states = self.transport.status(live) if live else {}
            for job_id, state in states.items():
                if job_id in self._jobs:
                    self._jobs[job_id] = _update(self._jobs[job_id], state)
            return self.jobs()

    def jobs(self) -> list[JobInfo]:
        """All jobs as last seen, oldest first (no network)."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.job_id)

    def active(self) -> list[JobInfo]:
        """Jobs not yet final, as last seen."""
        return [j for j in self.jobs() if not j.final]

    def kill(self, job_ids: list[int]) -> list[int]:
        """Kill some of the pool's jobs; return the ids the server killed."""
        if not job_ids:
            return []
        with self._lock:
            result = self.transport.kill(job_ids)
            now = datetime.now(UTC)
            for job_id in result.done:
                if job_id in self._jobs:
                    self._jobs[job_id] = replace(
                        self._jobs[job_id], status="Killed", minor_status="Marked for termination", since=now
                    )
            return result.done

    # -- scaling --------------------------------------------------------------------------------

    def scale(self, n: int) -> None:
        """Have exactly ``n`` jobs not yet final: submit more, or kill the surplus (pending ones first)."""
        with self._lock:
            active = [j for j in self.refresh() if not j.final]
            if n > len(active):
                self.submit(n - len(active))
            elif n < len(active):
                self.kill([j.job_id for j in _kill_order(active)[: len(active) - n]])

    def adapt(
        self,
        minimum: int = 0,
        maximum: int = 10,
        demand: Callable[[], int] | None = None,
        *,
        interval: float = 10.0,
        cooldown: float = 60.0,
        stuck_after: float = 600.0,
    ) -> Adaptive:
        """Follow ``demand()`` (how many jobs are wanted) within ``[minimum, maximum]`` in a background thread.

        Args:
            minimum: jobs kept even without demand.
            maximum: cap on jobs not yet final.
            demand: callable returning the wanted number of jobs; ``None`` keeps ``minimum``.
            interval: seconds between steps.
            cooldown: seconds between two scale-ups.
            stuck_after: seconds after submission at which a still pending job counts as stuck.

        Returns:
            The running :class:`Adaptive`; ``stop()`` it, or :meth:`close` the pool.
        """
        if not 0 <= minimum <= maximum:
            raise ValueError(f"need 0 <= minimum <= maximum, got minimum={minimum}, maximum={maximum}")
        with self._lock:
            self._check_open()
            previous, self._adaptive = (
                self._adaptive,
                Adaptive(self, minimum, maximum, demand or (lambda: minimum), interval, cooldown, stuck_after),
            )
        if previous is not None:
            previous.stop()
        self._adaptive.start()
        return self._adaptive

    # -- shutting down --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop adapting, kill (or delete) every job not yet final, revoke issued secrets. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            adaptive, self._adaptive = self._adaptive, None
        if adaptive is not None:
            adaptive.stop()
        try:
            with self._lock:
                live = [j.job_id for j in self._jobs.values() if not j.final]
                if live:
                    killed = self.kill(live)
                    log.info("close: killed %d of %d job(s)", len(killed), len(live))
                if self.delete_on_close and self._jobs:
                    self.transport.delete(list(self._jobs))
        finally:
            if self.secrets is not None and self._secret_env is not None:
                self.secrets.revoke()
            self.transport.close()

    def __enter__(self) -> JobPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this JobPool is closed")


class Adaptive:
    """The background loop of :meth:`JobPool.adapt`; :meth:`step` is one round of it."""

    def __init__(
        self,
        pool: JobPool,
        minimum: int,
        maximum: int,
        demand: Callable[[], int],
        interval: float,
        cooldown: float,
        stuck_after: float,
    ) -> None:
        self.pool = pool
        self.minimum, self.maximum = minimum, maximum
        self.demand = demand
        self.interval, self.cooldown, self.stuck_after = interval, cooldown, stuck_after
        self._last_up: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dirac_submit-adapt", daemon=True)

    def step(self) -> Decision:
        """Poll, compare with the demand, submit or kill once."""
        pool = self.pool
        with pool._lock:
            now = pool.clock()
            active = [j for j in pool.refresh() if not j.final]
            pending = [j for j in active if j.pending]
            stuck = [j for j in pending if now - j.submitted >= self.stuck_after]
            target = max(self.minimum, min(self.maximum, int(self.demand())))
            submitted = killed = 0
            if target > len(active):
                cooling = self._last_up is not None and now - self._last_up < self.cooldown
                if not stuck and not cooling:
                    submitted = len(pool.submit(target - len(active)))
                    self._last_up = now
            elif target < len(active):
                surplus = _kill_order(pending)[: len(active) - target]
                killed = len(pool.kill([j.job_id for j in surplus]))
            decision = Decision(target, len(active), len(pending), len(stuck), submitted, killed)
        log.debug("adapt: %s", decision)
        return decision

    def start(self) -> None:
        """Start the background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread (waits for a running step to end)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:  # a failed round must not end adaptation; the next one retries
                log.exception("adapt step failed")
            self._stop.wait(self.interval)


def _parametric_limit(err: ServiceError) -> int | None:
    """N from DIRAC's refusal "Number of parametric jobs exceeds the limit of N" (Errno 1501), else None."""
    match = _LIMIT.search(err.message)
    return int(match.group(1)) if err.errno == EWMSJDL and match else None


def _update(job: JobInfo, state: JobState) -> JobInfo:
    changed = state.status != job.status
    since = state.since or (datetime.now(UTC) if changed else job.since)
    return replace(job, status=state.status, minor_status=state.minor_status, site=state.site, since=since)


def _kill_order(jobs: list[JobInfo]) -> list[JobInfo]:
    """Pending before running, newest first: what to give up when shrinking."""
    return sorted(jobs, key=lambda j: (not j.pending, -j.submitted, -j.job_id))
