"""DIRAC's HTTPS (Tornado) services, v7.3+, with an X.509 proxy.

Wire format (DIRAC ``TornadoService``): one ``POST`` route per service, form fields
``method=<name>`` and ``args=<JSON list>``; the reply is ``{"OK": true, "Value": ...}`` or
``{"OK": false, "Errno": N, "Message": "..."}``; HTTP 400 (no method), 401 (credentials),
501 (unknown method). Dates come JSON-encoded as ``{"__dCls": "dt", "obj": "Y-m-d H:M:S"}`` and
dict keys that were ints come as strings::

    dirac = TornadoTransport("https://dirac.example.org:8443", proxy="/tmp/x509up_u1000",
                             ca_dir="/etc/grid-security/certificates")
    dirac.ping()["version"]
    [job_id] = dirac.submit([JobTemplate(["/bin/true"]).to_jdl()])
    dirac.status([job_id])[job_id].status      # 'Received'
    dirac.kill([job_id])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .errors import ServiceError
from .http import HTTPPolicy
from .proxy import Proxy, find_ca, load_proxy
from .transport import JobState, KillResult

_STATUS_FIELDS = ["Status", "MinorStatus", "Site", "LastUpdateTime"]


@dataclass(frozen=True)
class ServicePaths:
    """Where the admin mounted the services (``/<System>/<Component>`` by default)."""

    job_manager: str = "/WorkloadManagement/JobManager"
    job_monitoring: str = "/WorkloadManagement/JobMonitoring"


class TornadoTransport:
    """:class:`~dirac_submit.transport.Transport` over DIRAC's Tornado HTTPS services.

    Args:
        url: ``https://host:port`` of the DIRAC HTTPS server.
        proxy: X.509 proxy file (default ``$X509_USER_PROXY`` or ``/tmp/x509up_u<uid>``).
        ca_dir: CA directory or bundle (default ``$X509_CERT_DIR`` or ``/etc/grid-security/certificates``).
        paths: service paths.
        http: timeouts and retries.
    """

    def __init__(
        self,
        url: str,
        *,
        proxy: str | None = None,
        ca_dir: str | None = None,
        paths: ServicePaths | None = None,
        http: HTTPPolicy | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.proxy: Proxy = load_proxy(proxy)
        self.ca_dir = find_ca(ca_dir)
        self.paths = paths or ServicePaths()
        self.http = http or HTTPPolicy()
        self._session = self.http.session()

    def call(self, path: str, method: str, *args: Any, idempotent: bool = True) -> Any:
        """Call ``method(*args)`` of the service at ``path``; return its ``Value``.

        Raises:
            ServiceError: the reply was ``OK: false`` (message verbatim, with ``Service.method``).
            ProxyError, CAError, AuthError, HTTPStatusError, NetworkError: see :mod:`dirac_submit.errors`.
        """
        reply = self._call(path, method, list(args), idempotent)
        return reply["Value"]

    def _call(self, path: str, method: str, args: list[Any], idempotent: bool) -> dict[str, Any]:
        self.proxy.check()
        name = f"{path.rstrip('/').rsplit('/', 1)[-1]}.{method}"
        response = self.http.send(
            self._session,
            name,
            "POST",
            self.url + path,
            idempotent=idempotent,
            data={"method": method, "args": json.dumps(args)},
            cert=self.proxy.path,
            verify=self.ca_dir,
        )
        try:
            reply = json.loads(response.text, object_hook=_decode_dirac_object)
        except ValueError as err:
            raise ServiceError(name, 0, f"reply is not JSON: {response.text[:200]!r}", {}) from err
        if not isinstance(reply, dict) or "OK" not in reply:
            raise ServiceError(name, 0, f"reply is not a DIRAC result: {response.text[:200]!r}", {})
        if not reply["OK"]:
            raise ServiceError(name, int(reply.get("Errno", 0) or 0), str(reply.get("Message", "")), reply)
        return reply

    def ping(self) -> dict[str, Any]:
        """``JobManager.ping``: version, uptime, ... (allowed for any authenticated user)."""
        return self.call(self.paths.job_manager, "ping")

    def submit(self, jdls: Sequence[str]) -> list[int]:
        """``JobManager.submitJob`` each JDL; parametric ones are confirmed with ``confirmBulkSubmission``.

        A submission is never retried after a timeout (it may have created jobs).
        """
        ids: list[int] = []
        for jdl in jdls:
            value = self.call(self.paths.job_manager, "submitJob", jdl, idempotent=False)
            if isinstance(value, list):
                new = [int(i) for i in value]
                self.call(self.paths.job_manager, "confirmBulkSubmission", new)
                ids += new
            else:
                ids.append(int(value))
        return ids

    def status(self, job_ids: Sequence[int]) -> dict[int, JobState]:
        """``JobMonitoring.getJobsParameters(ids, [Status, MinorStatus, Site, LastUpdateTime])``."""
        if not job_ids:
            return {}
        value = self.call(self.paths.job_monitoring, "getJobsParameters", [int(i) for i in job_ids], _STATUS_FIELDS)
        return {
            int(key): JobState(
                job_id=int(key),
                status=str(attrs.get("Status", "")),
                minor_status=str(attrs.get("MinorStatus", "") or ""),
                site=str(attrs.get("Site", "") or ""),
                since=attrs.get("LastUpdateTime") if isinstance(attrs.get("LastUpdateTime"), datetime) else None,
            )
            for key, attrs in value.items()
        }

    def kill(self, job_ids: Sequence[int]) -> KillResult:
        """``JobManager.killJob``: ids killed; unknown ids come back as ``InvalidJobIDs``."""
        return self._kill_or_delete("killJob", job_ids)

    def delete(self, job_ids: Sequence[int]) -> KillResult:
        """``JobManager.deleteJob``."""
        return self._kill_or_delete("deleteJob", job_ids)

    def _kill_or_delete(self, method: str, job_ids: Sequence[int]) -> KillResult:
        if not job_ids:
            return KillResult([], [])
        reply = self._call(self.paths.job_manager, method, [[int(i) for i in job_ids]], True)
        return KillResult(
            done=[int(i) for i in reply["Value"]],
            rejected=[int(i) for i in reply.get("InvalidJobIDs", [])],
        )

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()


def _decode_dirac_object(obj: dict[str, Any]) -> Any:
    """Undo DIRAC's JEncode for dates (``{"__dCls": "dt", "obj": "..."}``; naive UTC on the server)."""
    kind = obj.get("__dCls")
    if kind == "dt":
        return datetime.strptime(obj["obj"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    if kind == "date":
        return datetime.strptime(obj["obj"], "%Y-%m-%d").date()
    return obj
