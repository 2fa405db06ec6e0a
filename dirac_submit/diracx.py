"""DiracX REST, with a bearer token.

Routes used (diracx-routers): ``POST /api/jobs/jdl`` (JSON list of JDL strings → 201
``[{"JobID": .., "Status": ..}]``), ``POST /api/jobs/search`` (``{"parameters": [...], "search":
[{"parameter": "JobID", "operator": "in", "values": [...]}]}``, paged with ``Content-Range``/206),
``PATCH /api/jobs/status`` (``{job_id: {timestamp: {"Status": "Killed", ...}}}`` → ``{"success":
{...}, "failed": {...}}``; 404 when nothing succeeded), ``GET /api/health/live``::

    dx = DiracXTransport("https://diracx.example.org")   # token from the v9 proxy or ~/.cache/diracx
    ids = dx.submit([JobTemplate(["/bin/true"]).to_jdl()])
    dx.status(ids); dx.kill(ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import requests

from .errors import HTTPStatusError
from .http import HTTPPolicy
from .proxy import BearerToken, load_diracx_token
from .transport import JobState, KillResult

_PER_PAGE = 100


class DiracXTransport:
    """:class:`~dirac_submit.transport.Transport` over DiracX's REST API.

    Args:
        url: base URL of DiracX (``https://host``; routes live under ``/api``).
        token: a :class:`~dirac_submit.proxy.BearerToken` or raw access token; default
            :func:`~dirac_submit.proxy.load_diracx_token`.
        ca: CA bundle/directory to verify the server, or ``True`` for the system store.
        http: timeouts and retries.
    """

    def __init__(
        self,
        url: str,
        *,
        token: BearerToken | str | None = None,
        ca: str | bool = True,
        http: HTTPPolicy | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        if isinstance(token, str):
            token = BearerToken(access_token=token, expires_on=None, source="the token argument")
        self.token = token or load_diracx_token()
        self.ca = ca
        self.http = http or HTTPPolicy()
        self._session = self.http.session()

    def _send(self, verb: str, path: str, *, idempotent: bool, **kwargs: Any) -> requests.Response:
        self.token.check()
        return self.http.send(
            self._session,
            f"{verb} {path}",
            verb,
            self.url + path,
            idempotent=idempotent,
            verify=self.ca,
            headers={"Authorization": f"Bearer {self.token.access_token}"},
            **kwargs,
        )

    def ping(self) -> dict[str, Any]:
        """``GET /api/health/live`` → ``{"status": "live"}``."""
        return self._send("GET", "/api/health/live", idempotent=True).json()

    def submit(self, jdls: Sequence[str]) -> list[int]:
        """``POST /api/jobs/jdl`` with all descriptions in one request (never retried after a timeout)."""
        response = self._send("POST", "/api/jobs/jdl", idempotent=False, json=list(jdls))
        return [int(job["JobID"]) for job in response.json()]

    def status(self, job_ids: Sequence[int]) -> dict[int, JobState]:
        """``POST /api/jobs/search`` for the ids, following pages."""
        states: dict[int, JobState] = {}
        ids = [int(i) for i in job_ids]
        page = 1
        while ids:
            response = self._send(
                "POST",
                "/api/jobs/search",
                idempotent=True,
                params={"page": page, "per_page": _PER_PAGE},
                json={
                    "parameters": ["JobID", "Status", "MinorStatus", "Site", "LastUpdateTime"],
                    "search": [{"parameter": "JobID", "operator": "in", "values": ids}],
                },
            )
            rows = response.json()
            for row in rows:
                states[int(row["JobID"])] = JobState(
                    job_id=int(row["JobID"]),
                    status=str(row.get("Status", "")),
                    minor_status=str(row.get("MinorStatus") or ""),
                    site=str(row.get("Site") or ""),
                    since=_parse_time(row.get("LastUpdateTime")),
                )
            if response.status_code != 206 or not rows:
                break
            page += 1
        return states

    def kill(self, job_ids: Sequence[int]) -> KillResult:
        """``PATCH /api/jobs/status`` to ``Killed``."""
        return self._set_status(job_ids, "Killed", "Marked for termination")

    def delete(self, job_ids: Sequence[int]) -> KillResult:
        """``PATCH /api/jobs/status`` to ``Deleted``."""
        return self._set_status(job_ids, "Deleted", "Checking accounting")

    def _set_status(self, job_ids: Sequence[int], status: str, minor: str) -> KillResult:
        if not job_ids:
            return KillResult([], [])
        now = datetime.now(UTC).isoformat()
        body = {str(int(i)): {now: {"Status": status, "MinorStatus": minor, "Source": "dirac_submit"}} for i in job_ids}
        try:
            result = self._send("PATCH", "/api/jobs/status", idempotent=True, json=body).json()
        except HTTPStatusError as err:
            if err.status != 404:
                raise
            # Nothing could be changed: every id is unknown or already final.
            return KillResult([], [int(i) for i in job_ids])
        return KillResult(
            done=[int(i) for i in result.get("success", {})],
            rejected=[int(i) for i in result.get("failed", {})],
        )

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
