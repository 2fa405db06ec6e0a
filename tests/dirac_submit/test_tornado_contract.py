"""Contract tests: TornadoTransport and JobPool against the DIRAC Tornado contract server.

The server speaks DIRAC's documented HTTPS wire format over mutual TLS with an RFC 3820 proxy and
runs every submitted payload as a real local process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dirac_pki import PKI
from tornado_contract_server import TornadoContractServer

from dirac_submit import (
    AuthError,
    CAError,
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


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_contract_ping_over_mutual_tls_with_proxy(transport: TornadoTransport) -> None:
    info = transport.ping()
    assert info["version"].startswith("v9")
    assert transport.proxy.identity == "/O=mqexec-test/CN=alice"


def test_contract_three_sleepers_run_and_close_kills_their_processes(
    transport: TornadoTransport, contract_server: TornadoContractServer
) -> None:
    pool = JobPool(transport, SLEEPER)
    ids = pool.submit(3)
    assert len(ids) == 3
    assert [c[1] for c in contract_server.calls] == ["submitJob", "confirmBulkSubmission"]

    wait_for(lambda: all(j.status == "Running" for j in pool.refresh()))
    jobs = pool.jobs()
    assert [j.job_id for j in jobs] == sorted(ids)
    assert {(j.site, j.minor_status) for j in jobs} == {("Local.contract.test", "Application")}
    assert all(j.since.tzinfo is not None for j in jobs)
    pids = [contract_server.jobs[i].process.pid for i in ids]
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
        assert [c[1] for c in contract_server.calls] == ["submitJob", "submitJob"]
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
    assert info.value.message == "Number of parametric jobs exceeds the limit of 20"
    assert str(info.value).startswith("JobManager.submitJob failed: Number of parametric jobs exceeds")


def test_contract_http_errors_400_404_501(transport: TornadoTransport) -> None:
    with pytest.raises(HTTPStatusError, match="HTTP 501") as info:
        transport.call(transport.paths.job_manager, "noSuchMethod")
    assert info.value.status == 501
    with pytest.raises(HTTPStatusError, match="HTTP 400"):
        transport.call(transport.paths.job_manager, "")
    with pytest.raises(HTTPStatusError, match="HTTP 404"):
        transport.call("/WorkloadManagement/NoSuchService", "ping")


def test_contract_unregistered_user_gets_401(pki: PKI, contract_server: TornadoContractServer) -> None:
    stranger = TornadoTransport(contract_server.url, proxy=str(pki.stranger_proxy), ca_dir=str(pki.ca_dir))
    with pytest.raises(AuthError, match="HTTP 401"):
        stranger.ping()


def test_contract_expired_proxy_says_when_and_how_to_renew(pki: PKI, contract_server: TornadoContractServer) -> None:
    with pytest.raises(ProxyError, match=r"expired at \d{4}-\d\d-\d\d .*dirac-proxy-init"):
        TornadoTransport(contract_server.url, proxy=str(pki.expired_proxy), ca_dir=str(pki.ca_dir))
    assert contract_server.calls == []


def test_missing_proxy_and_missing_ca_dir(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(ProxyError, match=r"no X\.509 proxy at .*dirac-proxy-init"):
        TornadoTransport("https://127.0.0.1:1", proxy=str(tmp_path / "nope"), ca_dir=str(pki.ca_dir))
    with pytest.raises(CAError, match=r"CA directory .*missing-certs does not exist.*X509_CERT_DIR"):
        TornadoTransport("https://127.0.0.1:1", proxy=str(pki.proxy), ca_dir=str(tmp_path / "missing-certs"))


def test_contract_server_not_signed_by_configured_ca(
    pki: PKI, contract_server: TornadoContractServer, tmp_path: Path
) -> None:
    other_cas = tmp_path / "other-cas"
    other_cas.mkdir()
    transport = TornadoTransport(contract_server.url, proxy=str(pki.proxy), ca_dir=str(other_cas))
    with pytest.raises(CAError, match="could not be verified"):
        transport.ping()


def test_contract_timeouts_are_retried_then_fail_clearly(pki: PKI, contract_server: TornadoContractServer) -> None:
    transport = TornadoTransport(
        contract_server.url,
        proxy=str(pki.proxy),
        ca_dir=str(pki.ca_dir),
        http=HTTPPolicy(timeout=0.3, retries=2, backoff=0.05),
    )
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
    with pytest.raises(NetworkError, match="did not answer after 2 attempts"):
        transport.ping()


CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dirac_submit import JobPool, JobTemplate, TornadoTransport
    url, proxy, ca, mode = sys.argv[1:]
    pool = JobPool(TornadoTransport(url, proxy=proxy, ca_dir=ca),
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
        [sys.executable, "-c", CLIENT_SCRIPT, contract_server.url, str(pki.proxy), str(pki.ca_dir), mode],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    ids = [int(i) for i in client.stdout.readline().split()]
    assert len(ids) == 2
    pids = [contract_server.jobs[i].process.pid for i in ids]
    if mode == "sigint":
        client.send_signal(signal.SIGINT)
    client.wait(timeout=20)
    assert {contract_server.jobs[i].status for i in ids} == {"Killed"}
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=5)
