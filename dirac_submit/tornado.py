"""DIRAC's HTTPS (Tornado) services, v7.3 to v9, with an X.509 proxy — spoken as DIRAC's own client does.

Wire format (DIRAC ``TornadoService`` and ``TornadoBaseClient._request``): one ``POST`` route per service, form
fields ``method=<name>``, ``args=<JSON list>``, ``clientSetup`` (DIRAC v9's client sends ``"None"``: v9 has no
setups; a v8 client sends its setup, and v8's JobManager answers HTTP 400 without it and files each job under
it) and ``clientVO`` when known. The reply is ``{"OK": true, "Value": ...}`` or ``{"OK": false, "Errno": N,
"Message": "..."}``; HTTP 400 (missing argument), 401 (credentials), 501 (unknown method). Dates come encoded
as ``{"__dCls": "dt", "obj": "Y-m-d H:M:S"}`` and dict keys that were ints come as strings::

    dirac = TornadoTransport("https://dirac.example.org:8443", proxy="/tmp/x509up_u1000",
                             ca_dir="/etc/grid-security/certificates")        # v8: setup="LHCb-Production"
    dirac.ping()["version"]
    [job_id] = dirac.submit([JobTemplate(["/bin/true"]).to_jdl()])
    dirac.status([job_id])[job_id].status      # 'Received'
    dirac.kill([job_id])

Job status comes from ``JobMonitoring.getJobsSummary`` (every attribute of the Jobs table), which DIRAC 7.3,
8.0 and 9.x all serve; ``getJobsParameters`` was removed in 9.0. A parametric submission is confirmed as DIRAC's
``WMSClient.submitJob`` does: up to 3 ``confirmBulkSubmission`` calls a second apart, then ``removeJob``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from .errors import DiracError, ProxyError, ServiceError
from .http import HTTPPolicy
from .proxy import Proxy, find_ca, load_proxy
from .transport import JobState, KillResult

EWMSSUBM = 1503  #: DIRAC's "Job submission error" errno
_CONFIRM_ATTEMPTS, _CONFIRM_PAUSE = 3, 1.0  # as WMSClient.submitJob
_PARAMETERS = re.compile(r"^\s*Parameters\s*=\s*(\d+)\s*;", re.MULTILINE)


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
        setup: the DIRAC setup (``/DIRAC/Setup`` of a ``dirac.cfg``, e.g. ``LHCb-Production``); only DIRAC v8 and
            older use it. Without it, the first submission asks the server's version and refuses on a v8 server,
            whose jobs would otherwise be filed under setup ``None`` and never run.
        vo: sent as ``clientVO``, as DIRAC's client does when it knows the VO (servers do not need it).
        paths: service paths.
        http: timeouts and retries.
    """

    def __init__(
        self,
        url: str,
        *,
        proxy: str | None = None,
        ca_dir: str | None = None,
        setup: str | None = None,
        vo: str | None = None,
        paths: ServicePaths | None = None,
        http: HTTPPolicy | None = None,
    ) -> None:
        if urlsplit(url).scheme != "https":
            raise DiracError(f"DIRAC's HTTPS services need an https:// URL (e.g. https://host:8443), not {url!r}")
        self.url = url.rstrip("/")
        self.proxy: Proxy = load_proxy(proxy)
        self.ca_dir = find_ca(ca_dir)
        self.setup, self.vo = setup, vo
        self.paths = paths or ServicePaths()
        self.http = http or HTTPPolicy()
        self._session = self.http.session()
        self._setup_checked = setup is not None

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
        form = {"method": method, "args": json.dumps(args), "clientSetup": self.setup or "None"}
        if self.vo:
            form["clientVO"] = self.vo
        response = self.http.send(
            self._session,
            name,
            "POST",
            self.url + path,
            idempotent=idempotent,
            data=form,
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

        Raises:
            ProxyError: DIRAC holds no proxy of yours with 5 h or more left (``requireProxyUpload``); the jobs
                just created are removed, and the message says which ``dirac-proxy-init`` uploads one.
            ServiceError: refused, or a bulk submission that could not be confirmed (its jobs are removed).
        """
        self._check_setup()
        ids: list[int] = []
        for jdl in jdls:
            ids += self._submit_one(jdl)
        return ids

    def _check_setup(self) -> None:
        if self._setup_checked:
            return
        version = str(self.ping().get("version", ""))
        major = re.match(r"v?(\d+)", version)
        if major is not None and int(major.group(1)) < 9:
            raise DiracError(
                f"DIRAC {version} at {self.url} files each job under the client's setup, and a job of another "
                "setup never runs: give the setup (the /DIRAC/Setup of a dirac.cfg for this server, e.g. "
                "LHCb-Production) as setup=... or mqexec's --dirac-setup"
            )
        self._setup_checked = True

    def _submit_one(self, jdl: str) -> list[int]:
        name = "JobManager.submitJob"
        reply = self._call(self.paths.job_manager, "submitJob", [jdl], False)
        value = reply["Value"]
        ids = [int(i) for i in value] if isinstance(value, list) else [int(value)]
        if reply.get("requireProxyUpload"):
            removal = self._remove(ids)  # they could never get the proxy a job needs
            raise ProxyError(
                f"DIRAC holds no proxy of {self.proxy.identity} with 5 hours or more left (requireProxyUpload), "
                f"so its jobs cannot get one: upload yours with `{self.proxy.init_command()}` (it uploads unless "
                f"given -N) and submit again; the {len(ids)} job(s) just created {removal}"
            )
        if isinstance(value, list):
            expected = _parametric_count(jdl)
            if expected is not None and len(ids) != expected:  # WMSClient leaves them unconfirmed: they never run
                raise ServiceError(
                    name,
                    EWMSSUBM,
                    f"The number of submitted jobs ({len(ids)}) does not match job description "
                    f"({expected}); they stay unconfirmed",
                    reply,
                )
            self._confirm(ids)
        return ids

    def _confirm(self, ids: list[int]) -> None:
        last: DiracError | None = None
        for attempt in range(_CONFIRM_ATTEMPTS):
            if attempt:
                time.sleep(_CONFIRM_PAUSE)
            try:
                self.call(self.paths.job_manager, "confirmBulkSubmission", ids)
                return
            except DiracError as err:
                last = err
        removal = self._remove(ids)
        raise ServiceError(
            "JobManager.confirmBulkSubmission",
            EWMSSUBM,
            f"Job submission failed to confirm bulk transaction after {_CONFIRM_ATTEMPTS} attempts ({last}); "
            f"the {len(ids)} job(s) created {removal}",
            {},
        )

    def _remove(self, ids: list[int]) -> str:
        """``JobManager.removeJob``, as WMSClient does with jobs that must not run; says how it went."""
        try:
            self.call(self.paths.job_manager, "removeJob", ids)
        except DiracError as err:
            return f"could not be removed ({err}): kill them with `mqexec jobs kill` or dirac-wms-job-kill"
        return "were removed"

    def status(self, job_ids: Sequence[int]) -> dict[int, JobState]:
        """``JobMonitoring.getJobsSummary(ids)``: Status, MinorStatus, Site, LastUpdateTime of each known job."""
        if not job_ids:
            return {}
        value = self.call(self.paths.job_monitoring, "getJobsSummary", [int(i) for i in job_ids])
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


def _parametric_count(jdl: str) -> int | None:
    """``Parameters = N`` of a parametric JDL (as :class:`~dirac_submit.jdl.JobTemplate` writes it), else None."""
    match = _PARAMETERS.search(jdl)
    return int(match.group(1)) if match else None


def _decode_dirac_object(obj: dict[str, Any]) -> Any:
    """Undo DIRAC's JEncode for dates (``{"__dCls": "dt", "obj": "..."}``; naive UTC on the server)."""
    kind = obj.get("__dCls")
    if kind == "dt":
        return datetime.strptime(obj["obj"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    if kind == "date":
        return datetime.strptime(obj["obj"], "%Y-%m-%d").date()
    return obj
