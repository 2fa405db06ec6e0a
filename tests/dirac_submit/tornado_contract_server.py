"""Contract test server for DIRAC's Tornado HTTPS services (JobManager, JobMonitoring), as DIRAC v9 or v8.

It reproduces the wire format of DIRAC's ``TornadoService`` and **runs each submitted job's payload as a local
process**: ``Executable + " " + Arguments`` through ``sh`` with ``ExecutionEnvironment`` URL-unquoted into the
environment, as DIRAC's JobWrapper does, mapping the process to Received → Waiting → Running → Done/Failed/Killed.

Checked against the released packages on PyPI (``pip download --no-deps DIRAC==<v>``), files under ``DIRAC/``:

- ``Core/Tornado/Server/TornadoService.py``, ``Core/Tornado/Server/private/BaseRequestHandler.py`` (9.0.28, 8.0.86):
  one POST route per service; form ``method`` missing → HTTP 400, ``export_<method>`` not found → 501 (checked
  before the credentials), bad or unregistered certificate → 401; the handler's ``initializeRequest`` runs just
  before the method; the reply is the JEncoded ``S_OK``/``S_ERROR`` without its ``CallStack``. Tornado's error
  page is ``<html><title>400: Bad Request</title><body>400: Bad Request</body></html>``.
- ``Core/Tornado/Client/private/TornadoBaseClient.py`` (9.0.28: ``clientSetup="None"``; 8.0.86: the client's
  setup) and ``Core/Tornado/Client/TornadoClient.py``: form fields ``method``, ``args`` (JEncoded list),
  ``clientSetup``, ``clientVO``, and ``extraCredentials`` only when set (hosts, delegation).
- ``WorkloadManagementSystem/Service/TornadoJobManagerHandler.py``: v8's ``initializeRequest`` reads
  ``get_argument("clientSetup")`` (HTTP 400 without it) and ``JobManagerHandler.export_submitJob`` files each job
  under that setup (``DIRACSetup``), which v8 pilots match on; v9 (9.0.28, 9.1.22) has no setup.
- ``WorkloadManagementSystem/Service/JobManagerHandler.py`` (identical in 9.0.28 and 9.1.22; 8.0.86 also has
  ``getMaxParametricJobs``): ``MAX_PARAMETRIC_JOBS = 20`` unless the CS sets ``MaxParametricJobs``; more is
  ``S_ERROR(EWMSJDL, "Number of parametric jobs exceeds the limit of 20")``; parametric jobs start in
  ``Submitting``/"Bulk transaction confirmation" until ``confirmBulkSubmission``; every submit/kill/delete reply
  carries ``requireProxyUpload`` (no proxy with ≥ 18000 s left in the ProxyManager); ``removeJob`` deletes jobs
  outright. ``DB/StatusUtils.py``: kill sets ``Killed``/"Marked for termination" at once and leaves a ``Kill``
  command that the job's watchdog picks up on its next heartbeat (``kill_delay`` here).
- ``WorkloadManagementSystem/Service/JobMonitoringHandler.py``: 9.0.0, 9.0.28 and 9.1.22 serve ``getJobsStates``
  (Status, MinorStatus, ApplicationStatus), ``getJobsStatus``, ``getJobsMinorStatus``, ``getJobsSites``,
  ``getJobSummary``, ``getJobsSummary`` (every column of the Jobs table, from ``DB/JobDB.sql``) but no longer
  ``getJobsParameters`` (removed in 9.0, PR #8254), which 8.0.86 still has; 7.3.38 serves ``getJobsSummary`` too.
- ``DIRACCommon/Core/Utilities/ReturnValues.py`` (9.0.28; ``Core/Utilities/ReturnValues.py`` in 8.0.86):
  ``S_ERROR(errno, text)`` has ``Message = "<strerror> ( <errno> : <text>)"``, e.g. "Invalid job description
  ( 1501 : Number of parametric jobs exceeds the limit of 20)".
- ``WorkloadManagementSystem/JobWrapper/JobWrapper.py``: the payload sees ``JOBID`` and ``DIRACSITE`` (9.0.28,
  9.1.22); 8.0.86 sets ``DIRACJOBID`` there and ``JOBID`` in ``JobWrapperTemplate.py``.

Reusable for end-to-end tests whose payloads are real workers::

    with TornadoContractServer(make_pki(tmp_path), workdir=tmp_path / "jobs", version="v8") as server:
        transport = TornadoTransport(server.url, proxy=str(pki.proxy), ca_dir=str(pki.ca_dir), setup=server.setup)
        ...
        server.jobs[job_id].stdout()     # what the payload printed

Knobs: ``version`` ("v9" or "v8"), ``capacity`` (jobs that may run at once; the rest stay Waiting),
``start_delay`` (seconds a job waits before it may start), ``delay`` (seconds every reply is held back),
``max_parametric`` (MaxParametricJobs), ``kill_delay`` (seconds before a killed job's payload learns of the kill),
``proxy_uploaded`` (False: replies say ``requireProxyUpload``), ``confirm_failures`` (how many
``confirmBulkSubmission`` calls fail first). Job ids start at a random number, as on a long-lived DIRAC.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote

from dirac_pki import PKI

EWMSJDL, EWMSSUBM = 1501, 1503
_STRERROR = {EWMSJDL: "Invalid job description", EWMSSUBM: "Job submission error"}
FINAL = {"Done", "Failed", "Killed", "Deleted"}
SITE = "Local.contract.test"
VERSIONS = {"v9": "9.0.28", "v8": "8.0.86"}
#: methods only DIRAC v8 serves (v9 removed them)
V8_ONLY = {"JobManager.getMaxParametricJobs", "JobMonitoring.getJobsParameters"}
_ERROR_PAGE = "<html><title>{0}: {1}</title><body>{0}: {1}</body></html>"


def _dt(value: datetime | None) -> dict[str, str] | None:
    return None if value is None else {"__dCls": "dt", "obj": value.strftime("%Y-%m-%d %H:%M:%S")}


def _error(errno: int, text: str, **extra: Any) -> dict[str, Any]:
    """DIRAC's ``S_ERROR`` as it reaches the client (no CallStack)."""
    message = f"{_STRERROR[errno]} ( {errno} : {text})" if errno else text
    return {"OK": False, "Errno": errno, "Message": message, **extra}


def parse_jdl(jdl: str) -> dict[str, Any]:
    """Read a flat JDL the way DIRAC's ClassAd does: values end at ';', '"' are dropped, list blanks stripped."""
    body = jdl.strip()
    if body.startswith("["):
        body = body[1:]
    if body.endswith("]"):
        body = body[:-1]
    attrs: dict[str, Any] = {}
    for statement in body.split(";"):
        if "=" not in statement:
            continue
        name, value = statement.split("=", 1)
        value = value.strip().replace("\n", "")
        if value.startswith("{"):
            items = value[1:-1].replace(" ", "").replace('"', "")
            attrs[name.strip()] = [item for item in items.split(",") if item]
        else:
            attrs[name.strip()] = value.replace('"', "")
    return attrs


@dataclass
class ContractJob:
    job_id: int
    owner: str
    attrs: dict[str, Any]
    workdir: Path
    setup: str = "None"
    status: str = "Received"
    minor: str = "Job accepted"
    site: str = "ANY"
    submitted: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: datetime | None = None
    ended: datetime | None = None
    eligible_at: float = 0.0
    terminate_at: float | None = None  #: when the payload learns of a kill (the watchdog's heartbeat)
    process: subprocess.Popen[bytes] | None = None

    def set(self, status: str, minor: str) -> None:
        self.status, self.minor, self.updated = status, minor, datetime.now(UTC)

    def stdout(self) -> str:
        path = self.workdir / "std.out"
        return path.read_text() if path.exists() else ""

    def summary(self, v8: bool) -> dict[str, Any]:
        """The job's row of the Jobs table, as ``getJobsSummary`` returns it (v8 has two more columns)."""
        row: dict[str, Any] = {
            "JobID": self.job_id,
            "JobType": "User",
            "JobGroup": "00000000",
            "Site": self.site,
            "JobName": self.attrs.get("JobName", "Unknown"),
            "Owner": self.owner.rsplit("=", 1)[-1],
            "OwnerGroup": "dirac_user",
            "VO": "mqexec-test",
            "SubmissionTime": _dt(self.submitted),
            "RescheduleTime": None,
            "LastUpdateTime": _dt(self.updated),
            "StartExecTime": _dt(self.started),
            "HeartBeatTime": _dt(self.started),
            "EndExecTime": _dt(self.ended),
            "Status": self.status,
            "MinorStatus": self.minor,
            "ApplicationStatus": "Unknown",
            "UserPriority": 1,
            "RescheduleCounter": 0,
            "VerifiedFlag": True,
            "AccountedFlag": False,
        }
        if v8:
            row.update(DIRACSetup=self.setup, OwnerDN=self.owner)
            del row["VO"]
        return row


class TornadoContractServer:
    """See the module docstring. Use as a context manager; ``url`` is ``https://127.0.0.1:<port>``."""

    def __init__(
        self,
        pki: PKI,
        *,
        workdir: Path,
        version: str = "v9",
        capacity: int | None = None,
        start_delay: float = 0.0,
        max_parametric: int = 20,
        kill_delay: float = 0.0,
        proxy_uploaded: bool = True,
        confirm_failures: int = 0,
        job_manager: str = "/WorkloadManagement/JobManager",
        job_monitoring: str = "/WorkloadManagement/JobMonitoring",
    ) -> None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {sorted(VERSIONS)}, not {version!r}")
        self.pki = pki
        self.workdir = workdir
        self.version = version
        self.setup = "Contract-Production" if version == "v8" else None  #: what v8 pilots match on
        self.capacity = capacity
        self.start_delay = start_delay
        self.max_parametric = max_parametric
        self.kill_delay = kill_delay
        self.proxy_uploaded = proxy_uploaded
        self.confirm_failures = confirm_failures
        self.paths = {job_manager: "JobManager", job_monitoring: "JobMonitoring"}
        self.authorized = {pki.user_dn}
        self.delay = 0.0
        self.calls: list[tuple[str, str]] = []
        self.forms: list[dict[str, str]] = []  #: every request's form fields (values as sent)
        self.jobs: dict[int, ContractJob] = {}
        self._next_id = 1_000_000 + secrets.randbelow(8_000_000)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.contract = self  # type: ignore[attr-defined]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.load_verify_locations(cafile=str(pki.ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._httpd.server_address[1]}"
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, daemon=True),
            threading.Thread(target=self._schedule, daemon=True),
        ]

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            for job in self.jobs.values():
                self._terminate(job)

    # -- the job "site": run payloads as local processes ----------------------------------------

    def _schedule(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                for job in self.jobs.values():
                    self._advance(job)

    def _advance(self, job: ContractJob) -> None:
        if job.terminate_at is not None and time.monotonic() >= job.terminate_at:
            job.terminate_at = None
            self._terminate(job)
        elif job.status == "Received":
            job.set("Waiting", "Pilot Agent Submission")
        elif job.status == "Waiting" and time.monotonic() >= job.eligible_at and job.setup == (self.setup or "None"):
            running = sum(1 for j in self.jobs.values() if j.status == "Running")
            if self.capacity is None or running < self.capacity:
                self._start(job)
        elif job.status == "Running" and job.process is not None and job.process.poll() is not None:
            job.ended = datetime.now(UTC)
            if job.process.returncode == 0:
                job.set("Done", "Execution Complete")
            else:
                job.set("Failed", "Application Finished With Errors")

    def _start(self, job: ContractJob) -> None:
        executable = job.attrs.get("Executable", "").strip()
        if "/" not in executable:
            executable = shutil.which(executable) or executable
        command = executable + (" " + job.attrs["Arguments"] if job.attrs.get("Arguments") else "")
        ids = {"JOBID": str(job.job_id)}
        if self.version == "v8":
            ids["DIRACJOBID"] = str(job.job_id)
        env = {k: v for k, v in os.environ.items() if k not in ("JOBID", "DIRACJOBID")}
        env.update(ids, DIRACSITE=SITE)
        for var in job.attrs.get("ExecutionEnvironment", []):
            name, value = var.split("=", 1)
            env[name] = unquote(value)
        job.workdir.mkdir(parents=True, exist_ok=True)
        with open(job.workdir / "std.out", "wb") as out, open(job.workdir / "std.err", "wb") as err:
            job.process = subprocess.Popen(
                command, shell=True, cwd=job.workdir, env=env, stdout=out, stderr=err, start_new_session=True
            )
        job.site, job.started = SITE, datetime.now(UTC)
        job.set("Running", "Application")

    @staticmethod
    def _terminate(job: ContractJob) -> None:
        process = job.process
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    # -- the services ---------------------------------------------------------------------------

    def serves(self, service: str, method: str) -> bool:
        """Whether this DIRAC version has ``export_<method>`` on the service (else HTTP 501)."""
        if f"{service}.{method}" in V8_ONLY and self.version != "v8":
            return False
        return bool(method) and (hasattr(self, f"{service}_{method}") or hasattr(self, f"any_{method}"))

    def dispatch(self, service: str, method: str, args: list[Any], owner: str) -> dict[str, Any]:
        """The DIRAC result of a call the server serves."""
        handler = getattr(self, f"{service}_{method}", None) or getattr(self, f"any_{method}")
        with self._lock:
            return handler(owner, *args)

    def any_ping(self, owner: str) -> dict[str, Any]:
        return {"OK": True, "Value": {"version": VERSIONS[self.version], "time": _dt(datetime.now(UTC))}}

    def JobManager_getMaxParametricJobs(self, owner: str) -> dict[str, Any]:
        return {"OK": True, "Value": self.max_parametric}

    def JobManager_submitJob(self, owner: str, jdl: str, setup: str = "None") -> dict[str, Any]:
        attrs = parse_jdl(jdl)
        if not attrs.get("Executable"):
            return _error(EWMSJDL, "Invalid JDL: no Executable")
        count = attrs.get("Parameters")
        texts = [jdl]
        if count is not None:
            n = int(count)
            if n > self.max_parametric:
                return _error(EWMSJDL, f"Number of parametric jobs exceeds the limit of {self.max_parametric}")
            start, step, width = (
                int(attrs.get("ParameterStart", 1)),
                int(attrs.get("ParameterStep", 0)),
                len(str(n - 1)),
            )
            texts = [jdl.replace("%n", str(i).zfill(width)).replace("%s", str(start + i * step)) for i in range(n)]
        ids = []
        for text in texts:
            self._next_id += 1
            job = ContractJob(self._next_id, owner, parse_jdl(text), self.workdir / str(self._next_id), setup)
            job.eligible_at = time.monotonic() + self.start_delay
            if count is not None:
                job.set("Submitting", "Bulk transaction confirmation")
            self.jobs[job.job_id] = job
            ids.append(job.job_id)
        value: Any = ids if count is not None else ids[0]
        return {"OK": True, "Value": value, "JobID": value, "requireProxyUpload": not self.proxy_uploaded}

    def JobManager_confirmBulkSubmission(self, owner: str, job_ids: list[int]) -> dict[str, Any]:
        if self.confirm_failures > 0:
            self.confirm_failures -= 1
            return _error(0, "Lock wait timeout exceeded; try restarting transaction")
        ids = [int(i) for i in job_ids]
        if not ids:
            return _error(EWMSSUBM, f"Invalid job specification: {job_ids}")
        jobs = [self.jobs.get(i) for i in ids]
        if any(j is None or j.owner != owner for j in jobs):
            return _error(EWMSSUBM, "Requested jobs for bulk transaction are not valid")
        if all(j.status in ("Received", "Checking", "Waiting", "Matched", "Running") for j in jobs if j):
            return {"OK": True, "Value": ids}
        if any(j.status != "Submitting" for j in jobs if j):
            return _error(EWMSSUBM, "Requested jobs for bulk transaction are not valid")
        for job in jobs:
            if job is not None:
                job.set("Received", "Job accepted")
        return {"OK": True, "Value": ids}

    def JobManager_killJob(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._kill_or_delete(owner, job_ids, delete=False)

    def JobManager_deleteJob(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._kill_or_delete(owner, job_ids, delete=True)

    def JobManager_removeJob(self, owner: str, job_ids: Any) -> dict[str, Any]:
        ids = [int(i) for i in (job_ids if isinstance(job_ids, list) else [job_ids])]
        invalid = [i for i in ids if i not in self.jobs]
        nonauth = [i for i in ids if i in self.jobs and self.jobs[i].owner != owner]
        valid = [i for i in ids if i in self.jobs and i not in nonauth]
        for job_id in valid:
            self._terminate(self.jobs.pop(job_id))
        if invalid or nonauth:
            error = _error(0, "Some jobs failed removal")
            if invalid:
                error["InvalidJobIDs"], error["Message"] = invalid, error["Message"] + ": invalid jobs"
            if nonauth:
                error["NonauthorizedJobIDs"], error["Message"] = nonauth, error["Message"] + ": non-authorized jobs"
            return error
        return {"OK": True, "Value": valid}

    def _kill_or_delete(self, owner: str, job_ids: Any, *, delete: bool) -> dict[str, Any]:
        ids = [int(i) for i in (job_ids if isinstance(job_ids, list) else [job_ids])]
        invalid = [i for i in ids if i not in self.jobs]
        nonauth = [i for i in ids if i in self.jobs and self.jobs[i].owner != owner]
        valid = [self.jobs[i] for i in ids if i in self.jobs and i not in nonauth]
        killed = [j for j in valid if j.status not in FINAL]
        for job in killed:
            job.set("Killed", "Marked for termination")
            if self.kill_delay > 0:  # the payload learns of it at the watchdog's next heartbeat
                job.terminate_at = time.monotonic() + self.kill_delay
            else:
                self._terminate(job)
        done = [j.job_id for j in killed]
        if delete:
            for job in valid:
                job.set("Deleted", "Checking accounting")
            done = [j.job_id for j in valid]
        if nonauth:
            return _error(0, "Some jobs failed deletion", NonauthorizedJobIDs=nonauth)
        result: dict[str, Any] = {"OK": True, "Value": done, "requireProxyUpload": not self.proxy_uploaded}
        if invalid:
            result["InvalidJobIDs"] = invalid
        return result

    def _attributes(self, job_ids: Any, names: list[str] | None) -> dict[str, Any]:
        ids = [int(i) for i in (job_ids if isinstance(job_ids, list) else str(job_ids).split(","))]
        v8 = self.version == "v8"
        rows = {str(i): self.jobs[i].summary(v8) for i in ids if i in self.jobs}
        if names is not None:
            rows = {key: {n: row[n] for n in sorted(names) if n in row} for key, row in rows.items()}
        return {"OK": True, "Value": rows}

    def JobMonitoring_getJobsStatus(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(job_ids, ["Status"])

    def JobMonitoring_getJobsMinorStatus(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(job_ids, ["MinorStatus"])

    def JobMonitoring_getJobsSites(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(job_ids, ["Site"])

    def JobMonitoring_getJobsStates(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(job_ids, ["Status", "MinorStatus", "ApplicationStatus"])

    def JobMonitoring_getJobsSummary(self, owner: str, job_ids: list[int]) -> dict[str, Any]:
        return self._attributes(job_ids, None)

    def JobMonitoring_getJobsParameters(self, owner: str, job_ids: Any, names: list[str]) -> dict[str, Any]:
        return self._attributes(job_ids, names)


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (timeout tests, TLS refusals) is not the server's problem: no traceback."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _reply(self, code: int, body: bytes, content_type: str = "text/html") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error_page(self, code: int, reason: str) -> None:
        self._reply(code, _ERROR_PAGE.format(code, reason).encode())

    def do_GET(self) -> None:
        self._error_page(405, "Method Not Allowed")

    def do_POST(self) -> None:
        server: TornadoContractServer = self.server.contract  # type: ignore[attr-defined]
        raw = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode(), keep_blank_values=True)
        form = {key: values[0] for key, values in raw.items()}
        method = form.get("method")
        server.calls.append((self.path, method or ""))
        server.forms.append(form)
        if server.delay:
            time.sleep(server.delay)
        service = server.paths.get(self.path)
        if service is None:
            return self._error_page(404, "Not Found")
        if method is None:  # tornado's MissingArgumentError
            return self._error_page(400, "Bad Request")
        if not server.serves(service, method):
            return self._error_page(501, "Not Implemented")
        owner = self._identity()
        if owner is None or owner not in server.authorized:
            return self._error_page(401, "Unauthorized")
        extra: list[Any] = []
        if server.version == "v8" and service == "JobManager":  # TornadoJobManagerHandler.initializeRequest
            if "clientSetup" not in form:
                return self._error_page(400, "Bad Request")
            extra = [form["clientSetup"]] if method == "submitJob" else []
        try:
            args = json.loads(form.get("args", "[]"))
            result = server.dispatch(service, method, [*args, *extra], owner)
        except (TypeError, ValueError) as err:
            return self._error_page(500, f"Internal Server Error ({err})")
        self._reply(200, json.dumps(result).encode(), "application/json")

    def _identity(self) -> str | None:
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        if not cert:
            return None
        dn = "".join(f"/{k}={v}" for rdn in cert["subject"] for k, v in rdn)
        dn = dn.replace("/organizationName=", "/O=").replace("/commonName=", "/CN=")
        # A proxy's subject is its issuer's plus one numeric CN per delegation.
        return re.sub(r"(/CN=\d+)+$", "", dn)
