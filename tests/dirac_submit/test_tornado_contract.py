"""Contract tests: TornadoTransport and JobPool against the DIRAC Tornado contract server, as DIRAC v9 and v8.

The server speaks DIRAC's HTTPS wire format (checked against DIRAC's source: see its docstring) over mutual TLS
with an RFC 3820 proxy and runs every submitted payload as a real local process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dirac_pki import PKI
from tornado_contract_server import SITE, VERSIONS, TornadoContractServer

from dirac_submit import (
    AuthError,
    CAError,
    DiracError,
    HTTPPolicy,
    HTTPStatusError,
    JobPool,
    JobTemplate,
    NetworkError,
    ProxyError,
    ServiceError,
    TornadoTransport,
)

SLEEPER = JobTemplate(["python3", "-c", "__import__('time').sleep(30)"], name="sleeper")


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def methods(server: TornadoContractServer) -> list[str]:
    """The methods called, without the version check (a ``ping`` before the first submission without a setup)."""
    return [method for _, method in server.calls if method != "ping"]


def pid_of(server: TornadoContractServer, job_id: int) -> int:
    process = server.jobs[job_id].process
    assert process is not None, f"job {job_id} never started"
    return process.pid


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_contract_ping_over_mutual_tls_with_proxy(transport: TornadoTransport, dirac_version: str) -> None:
    info = transport.ping()
    assert info["version"] == VERSIONS[dirac_version]
    assert transport.proxy.identity == "/O=mqexec-test/CN=alice"
    assert transport.proxy.group == "dirac_user"


def test_contract_every_request_carries_the_form_fields_of_diracs_client(
    connect: Callable[..., TornadoTransport], contract_server: TornadoContractServer, dirac_version: str
) -> None:
    """``method``, ``args``, ``clientSetup`` ("None" as DIRAC v9's client sends it, else the v8 setup) and
    ``clientVO`` when known; never ``extraCredentials`` (DIRAC's client sends it only for hosts and delegation)."""
    transport = connect(vo="mqexec-test")
    [job_id] = transport.submit([SLEEPER.to_jdl()])
    transport.status([job_id])
    transport.kill([job_id])
    setup = "Contract-Production" if dirac_version == "v8" else "None"
    asked_version = ["ping"] if dirac_version == "v9" else []  # no setup given: is the server older than v9?
    assert [f["method"] for f in contract_server.forms] == [*asked_version, "submitJob", "getJobsSummary", "killJob"]
    for form in contract_server.forms:
        assert set(form) == {"method", "args", "clientSetup", "clientVO"}
        assert (form["clientSetup"], form["clientVO"]) == (setup, "mqexec-test")
    assert json.loads(contract_server.forms[-1]["args"]) == [[job_id]]


def test_contract_v8_jobmanager_answers_400_without_client_setup(
    pki: PKI, transport: TornadoTransport, contract_server: TornadoContractServer, dirac_version: str
) -> None:
    """DIRAC v8's TornadoJobManagerHandler reads ``clientSetup`` (HTTP 400 without it); v9 does not need it."""
    url = contract_server.url + transport.paths.job_manager
    with transport.http.session() as session:

        def ping(form: dict[str, str]) -> int:
            response = session.post(url, data=form, cert=str(pki.proxy), verify=str(pki.ca_dir), timeout=5)
            return response.status_code

        assert ping({"method": "ping", "args": "[]"}) == (400 if dirac_version == "v8" else 200)
        assert ping({"method": "ping", "args": "[]", "clientSetup": "None"}) == 200
        assert ping({"args": "[]", "clientSetup": "None"}) == 400  # no method at all
    with pytest.raises(HTTPStatusError) as info:
        transport.http.send(
            transport._session,
            "JobManager.?",
            "POST",
            url,
            idempotent=True,
            data={"args": "[]"},
            cert=str(pki.proxy),
            verify=str(pki.ca_dir),
        )
    assert str(info.value) == f"JobManager.?: HTTP 400 Bad Request from {url}: 400: Bad Request"


def test_contract_v8_without_a_setup_is_refused_before_any_job_is_made(
    connect: Callable[..., TornadoTransport], contract_server: TornadoContractServer, dirac_version: str
) -> None:
    """A v8 server files a job under the client's setup; under "None" it would wait forever. Say so instead."""
    transport = connect(setup=None)
    if dirac_version == "v9":
        assert len(transport.submit([SLEEPER.to_jdl()])) == 1
        return
    with pytest.raises(DiracError, match=r"^DIRAC 8\.0\.86 at https://\S+ files each job under the client's setup"):
        transport.submit([SLEEPER.to_jdl()])
    assert contract_server.jobs == {}
    assert [c[1] for c in contract_server.calls] == ["ping"]


def test_contract_three_sleepers_run_and_close_kills_their_processes(
    transport: TornadoTransport, contract_server: TornadoContractServer
) -> None:
    pool = JobPool(transport, SLEEPER)
    ids = pool.submit(3)
    assert len(ids) == 3
    assert methods(contract_server) == ["submitJob", "confirmBulkSubmission"]

    wait_for(lambda: all(j.status == "Running" for j in pool.refresh()))
    jobs = pool.jobs()
    assert [j.job_id for j in jobs] == sorted(ids)
    assert {(j.site, j.minor_status) for j in jobs} == {("Local.contract.test", "Application")}
    assert all(j.since.tzinfo is not None for j in jobs)
    pids = [pid_of(contract_server, i) for i in ids]
    assert not any(gone(pid) for pid in pids)

    pool.close()
    assert {contract_server.jobs[i].status for i in ids} == {"Killed"}
    assert {j.status for j in pool.jobs()} == {"Killed"}
    assert all(gone(pid) for pid in pids)
    pool.close()  # idempotent


def test_contract_one_by_one_submission_and_payload_environment(
    transport: TornadoTransport, contract_server: TornadoContractServer
) -> None:
    template = JobTemplate(
        ["python3", "-c", "__import__('sys').stdout.write(__import__('os').environ.get('GREETING'))"],
        environment={"GREETING": 'a "quoted"; value, with blanks'},
    )
    with JobPool(transport, template, parametric=False) as pool:
        ids = pool.submit(2)
        assert methods(contract_server) == ["submitJob", "submitJob"]
        wait_for(lambda: all(j.status == "Done" for j in pool.refresh()))
    assert {contract_server.jobs[i].stdout() for i in ids} == {'a "quoted"; value, with blanks'}


def test_contract_failed_payload_is_reported_failed(transport: TornadoTransport) -> None:
    with JobPool(transport, JobTemplate(["false"])) as pool:
        pool.submit(1)
        wait_for(lambda: pool.refresh()[0].final)
        assert pool.jobs()[0].status == "Failed"


def test_contract_status_keys_are_strings_on_the_wire(transport: TornadoTransport) -> None:
    [job_id] = transport.submit([SLEEPER.to_jdl()])
    raw = transport.call(transport.paths.job_monitoring, "getJobsStatus", [job_id])
    assert list(raw) == [str(job_id)]
    assert transport.status([job_id])[job_id].status in {"Received", "Waiting", "Running"}
    transport.kill([job_id])


def test_contract_status_polling_uses_what_v9_serves(
    transport: TornadoTransport, contract_server: TornadoContractServer, dirac_version: str
) -> None:
    """DIRAC 9 removed ``getJobsParameters`` (HTTP 501 there); status comes from ``getJobsSummary`` on both."""
    with JobPool(transport, SLEEPER) as pool:
        ids = pool.submit(2)
        wait_for(lambda: all(j.status == "Running" for j in pool.refresh()))
        jobs = pool.jobs()
        assert [(j.job_id, j.site, j.minor_status) for j in jobs] == [(i, SITE, "Application") for i in sorted(ids)]
        server_times = {i: contract_server.jobs[i].updated.replace(microsecond=0) for i in ids}
        assert {j.job_id: j.since for j in jobs} == server_times  # LastUpdateTime, as the server has it
    methods = {c[1] for c in contract_server.calls}
    assert "getJobsSummary" in methods and "getJobsParameters" not in methods
    old_call = lambda: transport.call(transport.paths.job_monitoring, "getJobsParameters", ids, ["Status"])  # noqa: E731
    if dirac_version == "v9":
        with pytest.raises(HTTPStatusError, match="HTTP 501") as info:
            old_call()
        assert info.value.status == 501
    else:
        assert {int(k): v["Status"] for k, v in old_call().items()} == dict.fromkeys(ids, "Killed")


def test_contract_kill_unknown_ids_comes_back_as_invalid(transport: TornadoTransport) -> None:
    [job_id] = transport.submit([SLEEPER.to_jdl()])
    result = transport.kill([job_id, 999999])
    assert result.done == [job_id]
    assert result.rejected == [999999]
    assert transport.kill([job_id]).done == []  # already final: nothing to do


def test_contract_ok_false_is_surfaced_verbatim_with_method(transport: TornadoTransport) -> None:
    with pytest.raises(ServiceError) as info:
        transport.submit([SLEEPER.to_jdl(count=25)])
    assert info.value.call == "JobManager.submitJob"
    assert info.value.errno == 1501
    assert info.value.message == "Invalid job description ( 1501 : Number of parametric jobs exceeds the limit of 20)"
    assert str(info.value) == f"JobManager.submitJob failed: {info.value.message} (Errno 1501)"


def test_contract_bulk_submission_is_confirmed_again_after_a_failure(
    transport: TornadoTransport, contract_server: TornadoContractServer
) -> None:
    """As DIRAC's WMSClient: a failed confirmBulkSubmission is tried again (3 times, 1 s apart)."""
    contract_server.confirm_failures = 2
    ids = transport.submit([SLEEPER.to_jdl(count=3)])
    assert methods(contract_server) == ["submitJob"] + ["confirmBulkSubmission"] * 3
    wait_for(lambda: all(contract_server.jobs[i].status == "Running" for i in ids))
    transport.kill(ids)


def test_contract_unconfirmed_bulk_submission_is_removed(
    transport: TornadoTransport, contract_server: TornadoContractServer
) -> None:
    contract_server.confirm_failures = 3
    with pytest.raises(ServiceError, match="failed to confirm bulk transaction after 3 attempts") as info:
        transport.submit([SLEEPER.to_jdl(count=3)])
    assert "Lock wait timeout" in str(info.value) and "the 3 job(s) created were removed" in str(info.value)
    assert methods(contract_server) == ["submitJob"] + ["confirmBulkSubmission"] * 3 + ["removeJob"]
    assert contract_server.jobs == {}


@pytest.mark.parametrize("count", [1, 3])
def test_contract_require_proxy_upload_is_said_at_submit_time(
    transport: TornadoTransport, contract_server: TornadoContractServer, count: int
) -> None:
    """DIRAC's ProxyManager holds no proxy of ours with >= 5 h left: the jobs could never get one. Say so now,
    with the command that uploads one, and take the jobs back (unconfirmed, then removed)."""
    contract_server.proxy_uploaded = False
    with pytest.raises(ProxyError) as info:
        transport.submit([SLEEPER.to_jdl(count=count)])
    assert str(info.value) == (
        "DIRAC holds no proxy of /O=mqexec-test/CN=alice with 5 hours or more left (requireProxyUpload), so its "
        "jobs cannot get one: upload yours with `dirac-proxy-init -g dirac_user` (it uploads unless given -N) and "
        f"submit again; the {count} job(s) just created were removed"
    )
    assert methods(contract_server) == ["submitJob", "removeJob"]
    assert contract_server.jobs == {}


def test_contract_http_errors_400_404_501(transport: TornadoTransport) -> None:
    with pytest.raises(HTTPStatusError, match="HTTP 501") as info:
        transport.call(transport.paths.job_manager, "noSuchMethod")
    assert info.value.status == 501
    with pytest.raises(HTTPStatusError, match="HTTP 501"):  # an empty method name: DIRAC finds no export_
        transport.call(transport.paths.job_manager, "")
    with pytest.raises(HTTPStatusError, match="HTTP 404"):
        transport.call("/WorkloadManagement/NoSuchService", "ping")


def test_contract_unregistered_user_gets_401(
    connect: Callable[..., TornadoTransport], pki: PKI, contract_server: TornadoContractServer
) -> None:
    stranger = connect(proxy=str(pki.stranger_proxy))
    with pytest.raises(AuthError, match="HTTP 401") as info:
        stranger.ping()
    assert "\n" not in str(info.value) and "<" not in str(info.value)


def test_contract_expired_proxy_says_when_and_how_to_renew(
    connect: Callable[..., TornadoTransport], pki: PKI, contract_server: TornadoContractServer
) -> None:
    with pytest.raises(ProxyError, match=r"expired at \d{4}-\d\d-\d\d .*dirac-proxy-init -g dirac_user$"):
        connect(proxy=str(pki.expired_proxy))
    assert contract_server.calls == []


def test_missing_proxy_and_missing_ca_dir(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ProxyError, match=r"no X\.509 proxy at .*dirac-proxy-init"):
        TornadoTransport("https://127.0.0.1:1", proxy=str(tmp_path / "nope"), ca_dir=str(pki.ca_dir))
    with pytest.raises(CAError, match=r"CA directory .*missing-certs does not exist.*X509_CERT_DIR"):
        TornadoTransport("https://127.0.0.1:1", proxy=str(pki.proxy), ca_dir=str(tmp_path / "missing-certs"))
    with pytest.raises(DiracError, match=r"need an https:// URL .*not 'http://127\.0\.0\.1:1'"):
        TornadoTransport("http://127.0.0.1:1", proxy=str(pki.proxy), ca_dir=str(pki.ca_dir))


def test_contract_server_not_signed_by_configured_ca(
    connect: Callable[..., TornadoTransport], contract_server: TornadoContractServer, tmp_path: Path
) -> None:
    other_cas = tmp_path / "other-cas"
    other_cas.mkdir()
    with pytest.raises(CAError, match="could not be verified") as info:
        connect(ca_dir=str(other_cas)).ping()
    assert "\n" not in str(info.value)


def test_plain_http_port_is_not_blamed_on_the_proxy(pki: PKI) -> None:
    """An https:// URL pointing at a plain-HTTP port: OpenSSL's WRONG_VERSION_NUMBER, worded as what it is."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        transport = TornadoTransport(
            f"https://127.0.0.1:{port}",
            proxy=str(pki.proxy),
            ca_dir=str(pki.ca_dir),
            http=HTTPPolicy(timeout=5, retries=2, backoff=0.05),
        )
        with pytest.raises(NetworkError) as info:
            transport.ping()
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(info.value)
    assert message.startswith(f"127.0.0.1:{port} does not speak TLS ([SSL: WRONG_VERSION_NUMBER] wrong version")
    assert "is it a plain-HTTP port?" in message and "8443" in message
    assert "proxy" not in message and "\n" not in message


def test_contract_timeouts_are_retried_then_fail_clearly(
    connect: Callable[..., TornadoTransport], contract_server: TornadoContractServer
) -> None:
    # with a setup ("None": DIRAC v9's own value) the first submission does not ask for the server's version
    transport = connect(http=HTTPPolicy(timeout=0.3, retries=2, backoff=0.05), setup=contract_server.setup or "None")
    contract_server.delay = 1.0
    with pytest.raises(NetworkError, match="did not answer after 3 attempts"):
        transport.ping()
    assert [c[1] for c in contract_server.calls] == ["ping"] * 3
    contract_server.calls.clear()
    with pytest.raises(NetworkError, match="not retried"):
        transport.submit([SLEEPER.to_jdl()])
    assert [c[1] for c in contract_server.calls] == ["submitJob"]


def test_contract_unreachable_server_is_retried_then_fails(pki: PKI) -> None:
    transport = TornadoTransport(
        "https://127.0.0.1:9",
        proxy=str(pki.proxy),
        ca_dir=str(pki.ca_dir),
        http=HTTPPolicy(timeout=0.5, retries=1, backoff=0.01),
    )
    with pytest.raises(NetworkError) as info:
        transport.ping()
    assert str(info.value) == (
        "JobManager.ping: https://127.0.0.1:9/WorkloadManagement/JobManager did not answer after 2 attempts (last: "
        "connection failed: [Errno 111] Connection refused); check the URL, "
        "your network, or raise HTTPPolicy(timeout=..., retries=...)"
    )


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dirac_submit import JobPool, JobTemplate, TornadoTransport
    url, proxy, ca, setup, mode = sys.argv[1:]
    pool = JobPool(TornadoTransport(url, proxy=proxy, ca_dir=ca, setup=setup if setup != "-" else None),
                   JobTemplate(["python3", "-c", "__import__('time').sleep(30)"]))
    def run():
        pool.submit(2)
        while not all(j.status == "Running" for j in pool.refresh()):
            time.sleep(0.05)
        print(" ".join(str(j.job_id) for j in pool.jobs()), flush=True)
        if mode == "sigint":
            time.sleep(60)
    if mode == "sigint":
        with pool:
            run()
    else:
        run()   # no close(): the atexit hook must kill the jobs
    """
)


@pytest.mark.parametrize("mode", ["sigint", "exit"])
def test_contract_jobs_are_killed_on_ctrl_c_and_at_exit(
    pki: PKI, contract_server: TornadoContractServer, mode: str
) -> None:
    root = Path(__file__).resolve().parents[2]
    client = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLIENT_SCRIPT,
            contract_server.url,
            str(pki.proxy),
            str(pki.ca_dir),
            contract_server.setup or "-",
            mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert client.stdout is not None
    ids = [int(i) for i in client.stdout.readline().split()]
    assert len(ids) == 2
    pids = [pid_of(contract_server, i) for i in ids]
    if mode == "sigint":
        client.send_signal(signal.SIGINT)
    client.wait(timeout=20)
    assert {contract_server.jobs[i].status for i in ids} == {"Killed"}
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=5)
