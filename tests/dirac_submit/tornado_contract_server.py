"""Contract test server for DIRAC's Tornado HTTPS services (JobManager, JobMonitoring).

It reproduces the documented wire format of DIRAC v7.3+ ``TornadoService`` — one POST route per
service, form fields ``method`` and ``args`` (a JSON list), mutual TLS with RFC 3820 proxies,
``{"OK": true, "Value": ...}`` / ``{"OK": false, "Errno": N, "Message": "..."}``, HTTP 400 (no
``method``), 401 (no or unregistered certificate), 404 (unknown service path), 501 (unknown
method), dates as ``{"__dCls": "dt", "obj": "Y-m-d H:M:S"}`` and int dict keys as strings — and it
**runs each submitted job's payload as a local process**: ``Executable + " " + Arguments`` through
``sh`` with ``ExecutionEnvironment`` URL-unquoted into the environment, as DIRAC's JobWrapper
does, mapping the process to Received → Waiting → Running → Done/Failed/Killed.

Reusable for end-to-end tests whose payloads are real workers::

    with TornadoContractServer(make_pki(tmp_path), workdir=tmp_path / "jobs") as server:
        transport = TornadoTransport(server.url, proxy=str(pki.proxy), ca_dir=str(pki.ca_dir))
        ...
        server.jobs[job_id].stdout()     # what the payload printed

Knobs: ``capacity`` (jobs that may run at once; the rest stay Waiting), ``start_delay`` (seconds a
job waits before it may start), ``delay`` (seconds every reply is held back, for timeout tests),
``max_parametric`` (DIRAC's MaxParametricJobs, 20 by default).
"""

from __future__ import annotations

import json
import os
import re
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
from typing import Any
from urllib.parse import parse_qs, unquote

from dirac_pki import PKI

EWMSJDL, EWMSSUBM = 1501, 1503
FINAL = {"Done", "Failed", "Killed", "Deleted"}
SITE = "Local.contract.test"


def _dt(value: datetime) -> dict[str, str]:
    return {"__dCls": "dt", "obj": value.strftime("%Y-%m-%d %H:%M:%S")}


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
    status: str = "Received"
    minor: str = "Job accepted"
    site: str = "ANY"
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))
    eligible_at: float = 0.0
    process: subprocess.Popen[bytes] | None = None

    def set(self, status: str, minor: str) -> None:
        self.status, self.minor, self.updated = status, minor, datetime.now(UTC)

    def stdout(self) -> str:
        path = self.workdir / "std.out"
        return path.read_text() if path.exists() else ""


class TornadoContractServer:
    """See the module docstring. Use as a context manager; ``url`` is ``https://127.0.0.1:<port>``."""

    def __init__(
        self,
        pki: PKI,
        *,
        workdir: Path,
        capacity: int | None = None,
        start_delay: float = 0.0,
        max_parametric: int = 20,
        job_manager: str = "/WorkloadManagement/JobManager",
        job_monitoring: str = "/WorkloadManagement/JobMonitoring",
    ) -> None:
        self.pki = pki
        self.workdir = workdir
        self.capacity = capacity
        self.start_delay = start_delay
        self.max_parametric = max_parametric
        self.paths = {job_manager: "JobManager", job_monitoring: "JobMonitoring"}
        self.authorized = {pki.user_dn}
        self.delay = 0.0
        self.calls: list[tuple[str, str]] = []
        self.jobs: dict[int, ContractJob] = {}
        self._next_id = 1000
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
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

    def __enter__(self) -> TornadoContractServer:
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
        if job.status == "Received":
            job.set("Waiting", "Pilot Agent Submission")
        elif job.status == "Waiting" and time.monotonic() >= job.eligible_at:
            running = sum(1 for j in self.jobs.values() if j.status == "Running")
            if self.capacity is None or running < self.capacity:
                self._start(job)
        elif job.status == "Running" and job.process is not None and job.process.poll() is not None:
            if job.process.returncode == 0:
                job.set("Done", "Execution Complete")
            else:
                job.set("Failed", "Application Finished With Errors")

    def _start(self, job: ContractJob) -> None:
        executable = job.attrs.get("Executable", "").strip()
        if "/" not in executable:
            executable = shutil.which(executable) or executable
        command = executable + (" " + job.attrs["Arguments"] if job.attrs.get("Arguments") else "")
        env = dict(os.environ, DIRACJOBID=str(job.job_id), JOBID=str(job.job_id), DIRACSITE=SITE)
        for var in job.attrs.get("ExecutionEnvironment", []):
            name, value = var.split("=", 1)
            env[name] = unquote(value)
        job.workdir.mkdir(parents=True, exist_ok=True)
        with open(job.workdir / "std.out", "wb") as out, open(job.workdir / "std.err", "wb") as err:
            job.process = subprocess.Popen(
                command, shell=True, cwd=job.workdir, env=env, stdout=out, stderr=err, start_new_session=True
            )
        job.site = SITE
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

    def dispatch(self, service: str, method: str, args: list[Any], owner: str) -> dict[str, Any] | None:
        """Return the DIRAC result for a call, or None when the method does not exist (→ 501)."""
        handler = getattr(self, f"{service}_{method}", None) or getattr(self, f"any_{method}", None)
        if handler is None:
            return None
        with self._lock:
            return handler(owner, *args)

    def any_ping(self, owner: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        return {"OK": True, "Value": {"version": "v9.0.0-contract", "time": _dt(now), "name": "contract"}}

    def JobManager_getMaxParametricJobs(self, owner: str) -> dict[str, Any]:
        return {"OK": True, "Value": self.max_parametric}

    def JobManager_submitJob(self, owner: str, jdl: str) -> dict[str, Any]:
        attrs = parse_jdl(jdl)
        if not attrs.get("Executable"):
            return {"OK": False, "Errno": EWMSJDL, "Message": "Invalid JDL: no Executable"}
        count = attrs.get("Parameters")
        texts = [jdl]
        if count is not None:
            n = int(count)
            if n > self.max_parametric:
                return {
                    "OK": False,
                    "Errno": EWMSJDL,
                    "Message": f"Number of parametric jobs exceeds the limit of {self.max_parametric}",
                }
            start, step, width = (
                int(attrs.get("ParameterStart", 1)),
                int(attrs.get("ParameterStep", 0)),
                len(str(n - 1)),
            )
            texts = [jdl.replace("%n", str(i).zfill(width)).replace("%s", str(start + i * step)) for i in range(n)]
        ids = []
        for text in texts:
            self._next_id += 1
            job = ContractJob(self._next_id, owner, parse_jdl(text), self.workdir / str(self._next_id))
            job.eligible_at = time.monotonic() + self.start_delay
            if count is not None:
                job.set("Submitting", "Bulk transaction confirmation")
            self.jobs[job.job_id] = job
            ids.append(job.job_id)
        value: Any = ids if count is not None else ids[0]
        return {"OK": True, "Value": value, "JobID": value, "requireProxyUpload": False}

    def JobManager_confirmBulkSubmission(self, owner: str, job_ids: list[int]) -> dict[str, Any]:
        jobs = [self.jobs.get(int(i)) for i in job_ids]
        if not job_ids or any(j is None or j.owner != owner for j in jobs):
            return {"OK": False, "Errno": EWMSSUBM, "Message": "Requested jobs for bulk transaction are not valid"}
        for job in jobs:
            if job is not None and job.status == "Submitting":
                job.set("Received", "Job accepted")
        return {"OK": True, "Value": [int(i) for i in job_ids]}

    def JobManager_killJob(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._kill_or_delete(owner, job_ids, delete=False)

    def JobManager_deleteJob(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._kill_or_delete(owner, job_ids, delete=True)

    def _kill_or_delete(self, owner: str, job_ids: Any, *, delete: bool) -> dict[str, Any]:
        ids = [int(i) for i in (job_ids if isinstance(job_ids, list) else [job_ids])]
        invalid = [i for i in ids if i not in self.jobs]
        nonauth = [i for i in ids if i in self.jobs and self.jobs[i].owner != owner]
        valid = [self.jobs[i] for i in ids if i in self.jobs and i not in nonauth]
        killed = [j for j in valid if j.status not in FINAL]
        for job in killed:
            self._terminate(job)
            job.set("Killed", "Marked for termination")
        done = [j.job_id for j in killed]
        if delete:
            for job in valid:
                job.set("Deleted", "Checking accounting")
            done = [j.job_id for j in valid]
        if nonauth:
            return {"OK": False, "Errno": 0, "Message": "Some jobs failed deletion", "NonauthorizedJobIDs": nonauth}
        result: dict[str, Any] = {"OK": True, "Value": done, "requireProxyUpload": False}
        if invalid:
            result["InvalidJobIDs"] = invalid
        return result

    def _attributes(self, owner: str, job_ids: Any, names: list[str]) -> dict[str, Any]:
        ids = [int(i) for i in (job_ids if isinstance(job_ids, list) else str(job_ids).split(","))]
        values = {
            "Status": lambda j: j.status,
            "MinorStatus": lambda j: j.minor,
            "Site": lambda j: j.site,
            "LastUpdateTime": lambda j: _dt(j.updated),
            "JobName": lambda j: j.attrs.get("JobName", ""),
        }
        found = {
            str(i): {name: values[name](self.jobs[i]) for name in names if name in values}
            for i in ids
            if i in self.jobs
        }
        return {"OK": True, "Value": found}

    def JobMonitoring_getJobsStatus(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(owner, job_ids, ["Status"])

    def JobMonitoring_getJobsMinorStatus(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(owner, job_ids, ["MinorStatus"])

    def JobMonitoring_getJobsSites(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(owner, job_ids, ["Site"])

    def JobMonitoring_getJobsStates(self, owner: str, job_ids: Any) -> dict[str, Any]:
        return self._attributes(owner, job_ids, ["Status", "MinorStatus"])

    def JobMonitoring_getJobsParameters(self, owner: str, job_ids: Any, names: list[str]) -> dict[str, Any]:
        return self._attributes(owner, job_ids, names)


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

    def do_GET(self) -> None:
        self._reply(405, b"<html><title>405: Method Not Allowed</title></html>")

    def do_POST(self) -> None:
        server: TornadoContractServer = self.server.contract  # type: ignore[attr-defined]
        form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", 0))).decode())
        method = form.get("method", [""])[0]
        server.calls.append((self.path, method))
        if server.delay:
            time.sleep(server.delay)
        service = server.paths.get(self.path)
        if service is None:
            return self._reply(404, b"<html><title>404: Not Found</title></html>")
        if not method:
            return self._reply(400, b"<html><title>400: Bad Request</title></html>")
        owner = self._identity()
        if owner is None or owner not in server.authorized:
            return self._reply(401, b"<html><title>401: Unauthorized</title></html>")
        try:
            args = json.loads(form.get("args", ["[]"])[0])
            result = server.dispatch(service, method, args, owner)
        except (TypeError, ValueError) as err:
            return self._reply(500, f"<html><title>500: {err}</title></html>".encode())
        if result is None:
            return self._reply(501, b"<html><title>501: Not Implemented</title></html>")
        self._reply(200, json.dumps(result).encode(), "application/json")

    def _identity(self) -> str | None:
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        if not cert:
            return None
        dn = "".join(f"/{k}={v}" for rdn in cert["subject"] for k, v in rdn)
        dn = dn.replace("/organizationName=", "/O=").replace("/commonName=", "/CN=")
        # A proxy's subject is its issuer's plus one numeric CN per delegation.
        return re.sub(r"(/CN=\d+)+$", "", dn)
