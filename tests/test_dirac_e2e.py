"""Contract tests: mqexec workers as DIRAC jobs, end to end, against the DIRAC Tornado contract server (v9 and v8).

The contract server (``tests/dirac_submit/tornado_contract_server.py``) speaks DIRAC's HTTPS wire format, as checked
against DIRAC's own source (see its docstring), and runs every submitted job's payload as a local process, the way
DIRAC's JobWrapper would. So here the payloads are real ``mqexec dirac-boot worker ...`` processes: they fetch their
sealed worker environment from the run's key service over a least-privilege bootstrap user (made with
``rabbitmqctl``), connect to the real RabbitMQ, run a ``client.map`` and a coffea ``Runner``, and are killed by
``close()``. What DIRAC itself would do differently (pilots, matching, real sites, delegated proxies made by the
ProxyManager) is not tested here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dirac_submit"))
from dirac_pki import PKI, make_pki
from tornado_contract_server import SITE, TornadoContractServer

from mqexec.config import Config
from mqexec.dirac import (
    BOOT_URL_ENV,
    BootError,
    DiracSettings,
    DiracWorkers,
    Identity,
    answer_hello,
    boot,
    open_reply,
    worker_environment,
)
from mqexec.dirac.state import config_of
from mqexec.keys import Identity as SigningIdentity

ROOT = Path(__file__).resolve().parent.parent
HZZ = ROOT.parent / "shared" / "data" / "uproot-HZZ.root"
MQEXEC = [sys.executable, "-m", "mqexec"]


class RecordingServer(TornadoContractServer):
    """The contract server, keeping every JDL exactly as it arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.jdls: list[str] = []

    def JobManager_submitJob(self, owner: str, jdl: str, setup: str = "None") -> dict[str, Any]:
        self.jdls.append(jdl)
        return super().JobManager_submitJob(owner, jdl, setup)


class RabbitmqctlBootstrap:
    """A ``SecretIssuer`` making the bootstrap user with ``rabbitmqctl`` (the test broker has no management API)."""

    def __init__(self, permissions: dict[str, str], broker_url: str) -> None:
        self.permissions, self.broker_url = permissions, broker_url
        self.user: str | None = None

    def issue(self) -> dict[str, str]:
        self.user, password = f"mqexec-boot-test-{secrets.token_hex(4)}", secrets.token_hex(16)
        _ctl("add_user", self.user, password)
        _ctl(
            "set_permissions",
            "-p",
            "/",
            self.user,
            self.permissions["configure"],
            self.permissions["write"],
            self.permissions["read"],
        )
        host = urlsplit(self.broker_url)
        return {BOOT_URL_ENV: f"amqp://{self.user}:{password}@{host.hostname}:{host.port or 5672}//"}

    def revoke(self) -> None:
        if self.user:
            _ctl("delete_user", self.user)
            self.user = None


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["v9", "v8"])
def dirac_version(request: pytest.FixtureRequest) -> str:
    """The DIRAC version the contract server speaks."""
    return str(request.param)


@pytest.fixture
def server(
    pki: PKI,
    tmp_path: Path,
    broker_url: str,
    settings: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
    dirac_version: str,
) -> Iterator[RecordingServer]:
    """The contract server; its payloads see what a DIRAC job sees (proxy, CA dir), and no signing key."""
    parts = urlsplit(broker_url)
    if shutil.which("rabbitmqctl") is None or parts.hostname != "127.0.0.1" or (parts.port or 5672) != 5672:
        pytest.fail("the bootstrap user is made with rabbitmqctl on the local RabbitMQ at 127.0.0.1:5672")
    for name in ("MQEXEC_SECRET", "MQEXEC_SECRET_FILE", "MQEXEC_BROKER_URL", "DIRAC_URL", "JOBID", "DIRACJOBID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("X509_USER_PROXY", str(pki.proxy))
    monkeypatch.setenv("X509_CERT_DIR", str(pki.ca_dir))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))  # workers must not find a local key
    monkeypatch.setenv("MQEXEC_CACHE_DIR", str(tmp_path / "worker-cache"))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    with RecordingServer(pki, workdir=tmp_path / "jobs", version=dirac_version) as s:
        yield s


@pytest.fixture
def boot_url(broker_url: str, settings: dict[str, object]) -> Iterator[str]:
    """A standing bootstrap account for this test's queue prefix (what ``--bootstrap`` takes)."""
    prefix = str(settings["queue_prefix"])
    user = RabbitmqctlBootstrap(
        {"configure": rf"^{prefix}\.boot\..+$", "write": rf"^{prefix}\.boot\..+$", "read": rf"^{prefix}\.boot\..+$"},
        broker_url,
    )
    yield user.issue()[BOOT_URL_ENV]
    user.revoke()


def _wait_consuming(server: RecordingServer, n: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ready = [j.job_id for j in list(server.jobs.values()) if "consuming" in _stderr(j)]
        if len(ready) >= n:
            return ready
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- job {j.job_id} {j.status}\n{_stderr(j)[-1500:]}" for j in server.jobs.values())
            raise AssertionError(f"{len(ready)} of {n} workers consuming after {timeout} s\n{logs}")
        time.sleep(0.3)


def _stderr(job: Any) -> str:
    path = job.workdir / "std.err"
    return path.read_text(errors="replace") if path.exists() else ""


def _gone(job: Any, timeout: float = 20) -> bool:
    """The job's process and its whole process group (the worker's prefork children) have exited."""
    process = job.process
    if process is None or process.poll() is None:
        return False
    deadline = time.monotonic() + timeout  # orphaned pool children take a moment to exit and be reaped
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _assert_no_secrets(server: RecordingServer, broker_url: str, identity: str) -> None:
    """Neither the broker password nor the signing identity (nor the workers' token) is in any JDL, nor anywhere
    in any request to DIRAC."""
    password = urlsplit(broker_url).password or ""
    token = SigningIdentity.parse(identity).trust.token()
    assert server.jdls
    requests = json.dumps(server.forms)
    for jdl in server.jdls:
        for value in {password, quote(password, safe=""), identity, token, *token.split(".")[1:]}:
            assert value and value not in jdl, f"{value!r} is in the JDL:\n{jdl}"
            assert value not in requests, f"{value!r} was sent to DIRAC"
        assert "MQEXEC_SECRET" not in jdl and "MQEXEC_BROKER_URL" not in jdl and "MQEXEC_CONFIG" not in jdl
        assert BOOT_URL_ENV in jdl  # only the bootstrap account, which can do nothing but say hello


def _workers(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path, **kw: Any
) -> DiracWorkers:
    options: dict[str, Any] = {
        "sites": [SITE],
        "cores": 1,
        "walltime": "1h",
        "idle_timeout": "10m",
        "state_file": tmp_path / "state.json",
        **kw,
    }
    return DiracWorkers(
        DiracSettings(
            server.url,
            bootstrap=RabbitmqctlBootstrap,
            broker=broker_url,
            proxy=str(pki.proxy),
            ca_dir=str(pki.ca_dir),
            dirac_setup=server.setup,
            identity=str(settings["identity"]),
            config=Config.load(queue_prefix=settings["queue_prefix"]),
            command=(sys.executable, "-m", "mqexec"),
            **options,
        )
    )


def _cli_env(tmp_path: Path, settings: dict[str, object]) -> dict[str, str]:
    return {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "MQEXEC_IDENTITY": str(settings["identity"])}


def _submit_argv(
    server: RecordingServer, pki: PKI, broker_url: str, prefix: str, boot_url: str, *extra: str
) -> list[str]:
    argv = [*MQEXEC, "submit", "dirac", "--jobs", "2", "--url", server.url, "--proxy", str(pki.proxy)]
    argv += ["--ca-dir", str(pki.ca_dir), "--cores", "1", "--broker", broker_url, "--bootstrap", boot_url]
    argv += ["--walltime", "1h", "--queue-prefix", prefix, "--worker-command", f"{sys.executable} -m mqexec"]
    argv += ["--poll", "0.5", *(["--dirac-setup", server.setup] if server.setup else []), *extra]
    return argv


def _square(x: int) -> tuple[int, str | None]:
    return x * x, os.environ.get("JOBID")


def _coffea_processor() -> object:
    from coffea import processor

    class CountMuons(processor.ProcessorABC):  # type: ignore[misc]
        def process(self, events: Any) -> dict[str, int]:
            import awkward as ak

            return {"events": len(events), "muons": int(ak.sum(events.NMuon))}

        def postprocess(self, accumulator: object) -> object:
            return accumulator

    return CountMuons()


def test_contract_scale_run_close(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], client: Any, tmp_path: Path
) -> None:
    """Contract test: scale(3) → 3 real workers boot with sealed credentials, each named after its DIRAC job (v9:
    $JOBID, v8: $DIRACJOBID), a map and a coffea run complete on them, close() kills them; the JDL carries neither
    the broker password nor the signing key."""
    workers = _workers(server, pki, broker_url, settings, tmp_path)
    try:
        workers.scale(3)
        ids = _wait_consuming(server, 3)
        assert workers.keys.answered == 3 and workers.keys.refused == 0
        for job_id in ids:
            assert re.search(rf"worker mqexec-py3\.\d+-{job_id}@\S+ consuming", _stderr(server.jobs[job_id]))

        results = client.gather(client.map(_square, range(300)))
        assert [r for r, _ in results] == [x * x for x in range(300)]
        ran_on = {int(job) for _, job in results}
        assert ran_on and ran_on <= set(ids), "tasks ran somewhere else than the DIRAC jobs"

        if HZZ.exists():
            from coffea import processor
            from coffea.nanoevents import BaseSchema

            from mqexec import MQExecutor

            runner = processor.Runner(
                executor=MQExecutor(client=client, status=False), schema=BaseSchema, chunksize=500
            )
            out = runner(
                {"HZZ": {"files": {str(HZZ): "events"}}}, processor_instance=_coffea_processor(), treename="events"
            )
            assert out["events"] == 2421 and out["muons"] > 0

        jobs = workers.jobs()
        assert [j.job_id for j in jobs] == sorted(ids)
        assert {(j.status, j.site) for j in jobs} == {("Running", SITE)}
        assert workers.queue_depth() == 0 and workers.demand(tasks_per_worker=4) == 0
    finally:
        workers.close()
    assert all(_gone(j) for j in server.jobs.values()), "worker processes survived close()"
    assert {j.status for j in server.jobs.values()} == {"Killed"}
    _assert_no_secrets(server, broker_url, str(settings["identity"]))
    assert getattr(workers.pool.secrets, "user", "?") is None  # the bootstrap user was deleted


def test_contract_25_jobs_end_as_25_running_workers(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], client: Any, tmp_path: Path
) -> None:
    """DIRAC takes at most MaxParametricJobs (20) jobs per description: scale(25) goes out as 20 + 5, each batch
    confirmed, and ends as 25 workers, one per job."""
    workers = _workers(server, pki, broker_url, settings, tmp_path, idle_timeout=None)
    try:
        workers.scale(25)
        submissions = [m for _, m in server.calls if m in ("submitJob", "confirmBulkSubmission")]
        assert submissions == ["submitJob", "confirmBulkSubmission"] * 2
        assert [int(n) for jdl in server.jdls for n in re.findall(r"Parameters = (\d+);", jdl)] == [20, 5]
        ids = _wait_consuming(server, 25, timeout=240)
        assert sorted(ids) == sorted(server.jobs) and workers.keys.answered == 25
        assert len(workers.pool.active()) == 25
        results = client.gather(client.map(_square, range(100)))
        assert [r for r, _ in results] == [x * x for x in range(100)]
    finally:
        workers.close()
    assert {j.status for j in server.jobs.values()} == {"Killed"}
    assert all(_gone(j) for j in server.jobs.values())


def test_contract_stranger_proxy_is_refused(
    server: RecordingServer,
    pki: PKI,
    broker_url: str,
    settings: dict[str, object],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone who read the JDL (bootstrap URL and all) but holds another person's proxy gets nothing."""
    workers = _workers(server, pki, broker_url, settings, tmp_path, idle_timeout=None)
    try:
        workers.scale(1)
        _wait_consuming(server, 1)
        monkeypatch.setenv(BOOT_URL_ENV, workers.pool._secret_env[BOOT_URL_ENV])  # type: ignore[index]
        monkeypatch.setenv("MQEXEC_BOOT_QUEUE", workers.boot_queue)
        monkeypatch.setenv("X509_USER_PROXY", str(pki.stranger_proxy))
        with pytest.raises(BootError, match=r"refused.*mallory"):
            boot(timeout=30)
        assert workers.keys.refused == 1 and "mallory" in workers.keys.refusals[-1]
    finally:
        workers.close()


def test_reply_forged_by_another_person_is_rejected(pki: PKI) -> None:
    """A reply sealed to the job but signed by someone else's proxy (e.g. a JDL reader with their own
    certificate, trying to point the worker at their broker with their key) is rejected."""
    job, alice, mallory = (
        Identity.load(str(pki.proxy)),
        Identity.load(str(pki.proxy)),
        Identity.load(str(pki.stranger_proxy)),
    )
    hello = {"nonce": "ab" * 16, "chain": job.pems()}
    good = answer_hello(hello, alice, str(pki.ca_dir), {"MQEXEC_BROKER_URL": "amqp://x", "MQEXEC_SECRET": "k"})
    assert open_reply(good, job, str(pki.ca_dir), "ab" * 16)["MQEXEC_SECRET"] == "k"
    with pytest.raises(BootError, match=r"not valid|signature|mallory|not to"):
        forged = answer_hello({"nonce": "ab" * 16, "chain": mallory.pems()}, mallory, str(pki.ca_dir), {})
        forged["sealed"] = good["sealed"]
        open_reply(forged, job, str(pki.ca_dir), "ab" * 16)
    with pytest.raises(BootError, match="signature"):  # replayed for another hello
        open_reply(good, job, str(pki.ca_dir), "cd" * 16)


def test_worker_environment_is_all_that_travels() -> None:
    """One function decides what key material reaches a job's worker (sealed; nothing of it in a JDL)."""
    me = SigningIdentity.new()
    cfg = Config.load(broker_url="amqps://u:pw@broker.example.org:5671/v", identity=me.text(), queue_prefix="ana")
    env = worker_environment(cfg)
    assert list(env) == ["MQEXEC_CONFIG"]
    sent = json.loads(env["MQEXEC_CONFIG"])
    assert sent["broker_url"] == "amqps://u:pw@broker.example.org:5671/v" and sent["queue_prefix"] == "ana"
    assert sent["secret"] == me.trust.token() and not sent["identity"]  # verifies tasks, cannot sign one
    assert "cache_dir" not in sent and "key_file" not in sent  # this machine's paths stay here
    assert me.text() not in env["MQEXEC_CONFIG"]


@pytest.mark.parametrize("dirac_version", ["v9"])
def test_image_wraps_the_payload_in_apptainer(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path
) -> None:
    workers = _workers(server, pki, broker_url, settings, tmp_path, image="docker://registry/mqexec-worker:py3.11")
    try:
        jdl = workers.template.to_jdl(2)
        assert re.search(r'Executable = "apptainer";', jdl)
        assert "exec --bind /cvmfs docker://registry/mqexec-worker:py3.11" in jdl
        assert "dirac-boot --timeout 900 worker --concurrency 1 --idle-timeout 600 --max-walltime 3600" in jdl
    finally:
        workers.close()


def _lines(stream: Any, into: list[str]) -> threading.Thread:
    def read() -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _wait_for_line(lines: list[str], pattern: str, count: int = 1, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(found := [line for line in list(lines) if re.search(pattern, line)]) < count:
        assert time.monotonic() < deadline, f"no {count} line(s) like {pattern!r} in:\n" + "\n".join(lines)
        time.sleep(0.1)
    return found


def _steps(out: list[str], job_id: int) -> dict[str, float]:
    """``{"running": s, "credentials": s, "first task": s}`` after submission, from ``submit dirac``'s lines."""
    names = {"Running at": "running", "credentials handed out": "credentials", "first task started": "first task"}
    steps = {}
    for line in out:
        if match := re.fullmatch(rf"job {job_id}: (.*) \+(\d+\.\d) s", line):
            steps.update({name: float(match.group(2)) for key, name in names.items() if match.group(1).startswith(key)})
    return steps


def test_contract_cli_submit_jobs_kill(
    server: RecordingServer,
    pki: PKI,
    broker_url: str,
    settings: dict[str, object],
    client: Any,
    boot_url: str,
    tmp_path: Path,
) -> None:
    """Contract test of the CLI: ``mqexec submit dirac`` prints when each job runs, got its credentials and ran its
    first task (the time to the first worker); ``mqexec jobs`` shows the jobs; ``mqexec jobs kill --all`` kills
    them (status polled with what DIRAC v9 serves), and the submitter ends with exit 0."""
    env = _cli_env(tmp_path, settings)
    argv = _submit_argv(server, pki, broker_url, str(settings["queue_prefix"]), boot_url)
    argv += ["--site", "LCG.UKI-SOUTHGRID-RALPP.uk,LCG.UKI-LT2-Brunel.uk"]
    futures = client.map(_square, range(50))  # work waiting before any job is submitted
    submit = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out: list[str] = []
    reader = _lines(submit.stdout, out)
    try:
        results = client.gather(futures)
        assert [r for r, _ in results] == [x * x for x in range(50)]
        _wait_consuming(server, 2)
        ran = {int(job) for _, job in results}
        _wait_for_line(out, r"first task started", count=len(ran))
        _wait_for_line(out, r": Running at ", count=2)
        table = subprocess.run([*MQEXEC, "jobs"], env=env, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["JOB", "ID", "SITE"]
        rows = [line.split() for line in lines[1:]]
        assert sorted(int(r[0]) for r in rows) == sorted(server.jobs)
        assert all(r[1] == SITE and r[2] == "Running" for r in rows), table.stdout

        kill = subprocess.run([*MQEXEC, "jobs", "kill", "--all"], env=env, capture_output=True, text=True, timeout=60)
        assert kill.returncode == 0 and "killed 2 job(s)" in kill.stdout, kill.stdout + kill.stderr
        assert submit.wait(timeout=60) == 0, "\n".join(out)  # it sees every job final and ends
        reader.join(10)
    finally:
        if submit.poll() is None:
            submit.terminate()
            submit.wait(30)
    assert "getJobsParameters" not in {m for _, m in server.calls}
    assert re.search(r"submitted 2 job\(s\)", out[0]) and "every job has ended" in out[-2]
    assert re.fullmatch(r"run \w+: the first task started \+\d+\.\d s after submission \(job \d+\)", out[-1])
    for job_id in server.jobs:
        step = _steps(out, job_id)
        assert {"running", "credentials"} <= set(step), out
        if job_id in ran:
            assert step["credentials"] <= step["first task"] < 120, out
    assert all(_gone(j) for j in server.jobs.values())
    assert {j.status for j in server.jobs.values()} == {"Killed"}
    assert 'Site = {"LCG.UKI-SOUTHGRID-RALPP.uk", "LCG.UKI-LT2-Brunel.uk"}' in server.jdls[0]
    _assert_no_secrets(server, broker_url, str(settings["identity"]))
    print("\n".join(out))  # the time to the first worker, as docs/dirac.md quotes it (pytest -s)


def test_contract_submitter_whose_jobs_all_fail_exits_non_zero_with_the_reason(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], boot_url: str, tmp_path: Path
) -> None:
    prefix = str(settings["queue_prefix"])
    argv = _submit_argv(server, pki, broker_url, prefix, boot_url)
    argv[argv.index("--worker-command") + 1] = str(tmp_path / "no-such-mqexec")  # the jobs cannot even start it
    done = subprocess.run(argv, env=_cli_env(tmp_path, settings), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    ids = sorted(server.jobs)
    why = ", so no worker started: " + "; ".join(f"job {i} Failed (Application Finished With Errors)" for i in ids)
    assert done.stderr.splitlines()[-1] == (
        f"mqexec: error: run {done.stdout.split()[1].rstrip(':')}: none of its 2 job(s) got its credentials{why} "
        "(the jobs' std.err, in their output sandbox, says more)"
    )
    assert "Traceback" not in done.stderr


def _plain_http() -> ThreadingHTTPServer:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


BAD_INPUTS = {
    # case: (how to change the command line, the error line's pattern)
    "no DIRAC URL": (lambda a, s, p, t: _drop(a, "--url"), r"no DIRAC server: pass --url https://host:8443"),
    "no bootstrap": (lambda a, s, p, t: _drop(a, "--bootstrap"), r"no bootstrap account for the jobs"),
    "missing proxy": (
        lambda a, s, p, t: _set(a, "--proxy", str(t / "nope")),
        r"no X\.509 proxy at \S+/nope; create one with: dirac-proxy-init -g <your_group>$",
    ),
    "expired proxy": (
        lambda a, s, p, t: _set(a, "--proxy", str(p.expired_proxy)),
        r"expired at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; renew it with: dirac-proxy-init -g dirac_user$",
    ),
    "missing CA dir": (lambda a, s, p, t: _set(a, "--ca-dir", str(t / "no-cas")), r"CA directory \S+ does not exist"),
    "server not signed by our CAs": (
        lambda a, s, p, t: _set(a, "--ca-dir", str(_mkdir(t / "other-cas"))),
        r"the certificate of https://127\.0\.0\.1:\d+/\S+ could not be verified .*X509_CERT_DIR",
    ),
    "unregistered user": (
        lambda a, s, p, t: _set(a, "--proxy", str(p.stranger_proxy)),
        r"HTTP 401 Unauthorized from https://\S+: the server did not accept your credentials",
    ),
    "nothing listening": (
        lambda a, s, p, t: _set(a, "--url", "https://127.0.0.1:9"),
        r"did not answer after 4 attempts \(last: connection failed: \[Errno 111\] Connection refused\)",
    ),
    "plain-HTTP port": (
        lambda a, s, p, t: _set(a, "--url", f"https://127.0.0.1:{s.plain.server_address[1]}"),
        r"127\.0\.0\.1:\d+ does not speak TLS .*is it a plain-HTTP port\?",
    ),
    "JDL cannot carry a site": (
        lambda a, s, p, t: [*a, "--site", "LCG.A;rm"],
        r"Site 'LCG\.A;rm' contains ';': DIRAC's JDL parser ends a value at the first ';'",
    ),
    "no proxy uploaded to DIRAC": (
        lambda a, s, p, t: _no_proxy_upload(s, a),
        r"DIRAC holds no proxy of /O=mqexec-test/CN=alice .*upload yours with `dirac-proxy-init -g dirac_user`",
    ),
    "wrong broker password": (
        lambda a, s, p, t: _set(a, "--broker", "amqp://guest:not-this@127.0.0.1:5672//"),
        r"broker amqp://guest:\*\*\*@127\.0\.0\.1:5672// refused the login of user 'guest': wrong user name or pass",
    ),
}


def _drop(argv: list[str], option: str) -> list[str]:
    i = argv.index(option)
    return argv[:i] + argv[i + 2 :]


def _set(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def _no_proxy_upload(server: RecordingServer, argv: list[str]) -> list[str]:
    server.proxy_uploaded = False
    return argv


def _mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


@pytest.mark.parametrize("dirac_version", ["v9"])
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_cli_bad_input_is_one_line_and_exit_2(
    server: RecordingServer,
    pki: PKI,
    broker_url: str,
    settings: dict[str, object],
    tmp_path: Path,
    case: str,
) -> None:
    """Every DIRAC, proxy, CA, network, HTTP, JDL and broker error reaches the user as one sentence, exit code 2."""
    change, expected = BAD_INPUTS[case]
    boot = "amqp://mqexec-boot-nobody:unused@127.0.0.1:5672//"  # the jobs never start in these cases
    server.plain = _plain_http()  # type: ignore[attr-defined]
    try:
        argv = change(_submit_argv(server, pki, broker_url, str(settings["queue_prefix"]), boot), server, pki, tmp_path)
        done = subprocess.run(argv, env=_cli_env(tmp_path, settings), capture_output=True, text=True, timeout=120)
    finally:
        server.plain.shutdown()  # type: ignore[attr-defined]
        server.plain.server_close()  # type: ignore[attr-defined]
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("mqexec: error: ") and re.search(expected, line), line
    assert "not-this" not in line and "unused" not in line
    assert all(j.status in ("Killed", "Deleted") for j in server.jobs.values())


@pytest.mark.parametrize("dirac_version", ["v8"])
def test_cli_v8_without_a_setup_says_which_option_fixes_it(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path
) -> None:
    argv = _drop(
        _submit_argv(server, pki, broker_url, str(settings["queue_prefix"]), "amqp://b:b@127.0.0.1//"), "--dirac-setup"
    )
    done = subprocess.run(argv, env=_cli_env(tmp_path, settings), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"mqexec: error: DIRAC 8.0.86 at {server.url} files each job under the client's setup, and a job of another "
        "setup never runs: give the setup (the /DIRAC/Setup of a dirac.cfg for this server, e.g. LHCb-Production) as "
        "setup=... or mqexec's --dirac-setup"
    ]
    assert server.jobs == {}


def _stamp(path: str) -> None:
    """A task that notes which DIRAC job's worker started it, and when."""
    with open(path, "a") as out:
        out.write(f"{os.environ.get('JOBID')} {time.time()}\n")
    time.sleep(0.3)


@pytest.mark.parametrize("how", ["jobs kill", "close()"])
def test_contract_no_task_starts_on_a_killed_jobs_worker_after_the_kill_returns(
    server: RecordingServer,
    pki: PKI,
    broker_url: str,
    settings: dict[str, object],
    client: Any,
    tmp_path: Path,
    how: str,
) -> None:
    """DIRAC's kill reaches a running payload only at its watchdog's next heartbeat (here: 120 s later). So
    ``mqexec jobs kill`` and ``close()`` also tell exactly the killed jobs' workers, through the broker, to stop
    taking tasks: none starts one after the kill returns, while the job's process still runs."""
    server.kill_delay = 120.0
    stamps = tmp_path / "stamps"
    stamps.touch()
    workers = _workers(server, pki, broker_url, settings, tmp_path, idle_timeout=None)
    feeding = threading.Event()
    try:
        workers.scale(2)
        victim, other = sorted(_wait_consuming(server, 2))

        def feed() -> None:
            while not feeding.is_set():
                client.map(_stamp, [str(stamps)] * 4)
                time.sleep(0.2)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        deadline = time.monotonic() + 60
        while {line.split()[0] for line in stamps.read_text().splitlines()} != {str(victim), str(other)}:
            assert time.monotonic() < deadline, "tasks did not reach both workers"
            time.sleep(0.2)
        if how == "jobs kill":
            env = _cli_env(tmp_path, settings)
            kill = subprocess.run(
                [*MQEXEC, "jobs", "--state", str(tmp_path / "state.json"), "kill", str(victim)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert kill.returncode == 0 and "killed 1 job(s)" in kill.stdout, kill.stdout + kill.stderr
        else:
            workers.close()
        returned = time.time()
        time.sleep(3.0)  # tasks keep coming
    finally:
        feeding.set()
        workers.close()
    started = [(job, float(t)) for job, t in (line.split() for line in stamps.read_text().splitlines())]
    assert [t for job, t in started if job == str(victim) and t > returned] == []
    assert server.jobs[victim].process is not None and server.jobs[victim].status == "Killed"
    if how == "jobs kill":  # exactly the killed job's worker stopped
        assert any(job == str(other) and t > returned for job, t in started)


@pytest.mark.parametrize("dirac_version", ["v9"])
def test_state_file_is_private_whatever_the_umask(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path
) -> None:
    """It may hold the broker URL with its password and the signing key (``mqexec jobs kill`` needs them)."""
    server.capacity = 0  # nothing needs to run
    state = tmp_path / "state" / "mqexec" / "dirac-jobs.json"
    state.parent.mkdir(parents=True, mode=0o755)
    old = os.umask(0)
    try:
        workers = _workers(server, pki, broker_url, settings, tmp_path, state_file=state)
        try:
            workers.scale(1)
        finally:
            workers.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.parent.iterdir()} == {
        "dirac-jobs.json": 0o600,
        "dirac-jobs.lock": 0o600,
    }
    record = json.loads(state.read_text())["runs"][workers.run]
    assert record["jobs"] == sorted(server.jobs)
    cfg = config_of(record)
    assert cfg is not None
    assert (cfg.broker_url, cfg.queue_prefix, cfg.identity) == (
        broker_url,
        settings["queue_prefix"],
        settings["identity"],
    )


def test_contract_adapt_follows_queue_depth(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path
) -> None:
    """adapt(): ceil(waiting tasks / tasks_per_worker) jobs, capped at maximum."""
    from kombu import Producer

    from mqexec.app import task_queue
    from mqexec.broker import connect

    server.capacity = 0  # the jobs stay Waiting, so nothing drains the backlog while we look
    cfg = Config.load(broker_url=broker_url, queue_prefix=settings["queue_prefix"])
    with connect(cfg) as conn:
        queue = task_queue(cfg)(conn.default_channel)
        queue.declare()
        producer = Producer(conn.default_channel, exchange=queue.exchange)
        for i in range(10):
            producer.publish({"backlog": i}, routing_key=queue.routing_key, serializer="json")
    workers = _workers(server, pki, broker_url, settings, tmp_path)
    try:
        assert workers.queue_depth() == 10 and workers.demand(tasks_per_worker=4) == 3
        workers.adapt(0, 2, tasks_per_worker=4, interval=0.2, cooldown=0)
        deadline = time.monotonic() + 30
        while len(server.jobs) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # a few more adapt rounds: the cap holds
        assert len(server.jobs) == 2
    finally:
        workers.close()
    assert {j.status for j in server.jobs.values()} == {"Killed"}
