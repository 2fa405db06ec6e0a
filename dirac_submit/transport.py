"""What a pool needs from DIRAC, whichever protocol carries it.

:class:`~dirac_submit.tornado.TornadoTransport` (DIRAC's HTTPS services, X.509 proxy) and
:class:`~dirac_submit.diracx.DiracXTransport` (DiracX REST, bearer token) both implement it::

    transport: Transport = TornadoTransport("https://dirac.example.org:8443")
    ids = transport.submit([template.to_jdl(count=3)])
    states = transport.status(ids)       # {123: JobState(123, "Waiting", "Pilot Agent Submission", ...)}
    transport.kill(ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

#: Job statuses after which a job never runs again.
FINAL_STATUSES = frozenset({"Done", "Completed", "Failed", "Killed", "Deleted", "Stalled"})
#: Statuses of a job that was accepted but has not started on a worker node yet.
PENDING_STATUSES = frozenset({"Submitting", "Received", "Checking", "Staging", "Waiting", "Matched", "Rescheduled"})


@dataclass(frozen=True)
class JobState:
    """One job as the server reports it.

    Attributes:
        job_id: DIRAC job id.
        status: major status (``Waiting``, ``Running``, ``Done``, ...).
        minor_status: DIRAC's minor status text.
        site: site the job is at or bound for (``ANY``/``Unknown`` before matching).
        since: server time of the last status change (UTC), when the server reports it.
    """

    job_id: int
    status: str
    minor_status: str = ""
    site: str = ""
    since: datetime | None = None


@dataclass(frozen=True)
class KillResult:
    """Outcome of a kill/delete.

    Attributes:
        done: ids the server killed/deleted.
        rejected: ids it refused: unknown to it (DIRAC's ``InvalidJobIDs``) or, on DiracX, not in a
            state that allows the change. Jobs already final are in neither list on DIRAC.
    """

    done: list[int]
    rejected: list[int]


class Transport(Protocol):
    """The operations a :class:`~dirac_submit.pool.JobPool` uses."""

    def ping(self) -> dict[str, Any]:
        """Probe the service; return its self-description."""
        ...

    def submit(self, jdls: Sequence[str]) -> list[int]:
        """Submit job descriptions (each may be parametric); return all new job ids."""
        ...

    def status(self, job_ids: Sequence[int]) -> dict[int, JobState]:
        """Current state of the given jobs; unknown ids are absent."""
        ...

    def kill(self, job_ids: Sequence[int]) -> KillResult:
        """Kill the given jobs (jobs already final are left as they are)."""
        ...

    def delete(self, job_ids: Sequence[int]) -> KillResult:
        """Delete the given jobs (kill them first if they run)."""
        ...

    def close(self) -> None:
        """Release network resources."""
        ...
