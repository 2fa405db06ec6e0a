"""Contract tests: mqexec workers as DIRAC jobs, end to end, against the DIRAC Tornado contract server.

The contract server (``tests/dirac_submit/tornado_contract_server.py``) speaks DIRAC's HTTPS wire format and
runs every submitted job's payload as a local process, the way DIRAC's JobWrapper would. So here the
payloads are real ``mqexec dirac-boot worker ...`` processes: they fetch their sealed broker URL and
signing key from the run's key service over a least-privilege bootstrap user (made with ``rabbitmqctl``),
connect to the real RabbitMQ, run a ``client.map`` and a coffea ``Runner``, and are killed by ``close()``.
What DIRAC itself would do differently (pilots, matching, real sites, delegated proxies made by the
ProxyManager) is not tested here.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "dirac_submit"))
from dirac_pki import PKI, make_pki
from tornado_contract_server import SITE, TornadoContractServer

from mqexec.config import Config
from mqexec.dirac import BOOT_URL_ENV, BootError, DiracWorkers, Identity, answer_hello, boot, open_reply

ROOT = Path(__file__).resolve().parent.parent
HZZ = ROOT.parent / "shared" / "data" / "uproot-HZZ.root"


class RecordingServer(TornadoContractServer):
    """The contract server, keeping every JDL exactly as it arrived."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.jdls: list[str] = []

    def JobManager_submitJob(self, owner: str, jdl: str) -> dict[str, object]:
        self.jdls.append(jdl)
        return super().JobManager_submitJob(owner, jdl)


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


@pytest.fixture
def server(
    pki: PKI, tmp_path: Path, broker_url: str, settings: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> Iterator[RecordingServer]:
    """The contract server; its payloads see what a DIRAC job sees (proxy, CA dir), and no signing key."""
    parts = urlsplit(broker_url)
    if shutil.which("rabbitmqctl") is None or parts.hostname != "127.0.0.1" or (parts.port or 5672) != 5672:
        pytest.skip("the bootstrap user is made with rabbitmqctl on the local RabbitMQ at 127.0.0.1:5672")
    for name in ("MQEXEC_SECRET", "MQEXEC_SECRET_FILE", "MQEXEC_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("X509_USER_PROXY", str(pki.proxy))
    monkeypatch.setenv("X509_CERT_DIR", str(pki.ca_dir))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-config"))  # workers must not find a local key
    monkeypatch.setenv("MQEXEC_CACHE_DIR", str(tmp_path / "worker-cache"))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    with RecordingServer(pki, workdir=tmp_path / "jobs") as s:
        yield s


def _wait_consuming(server: RecordingServer, n: int, timeout: float = 90) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ready = [j.job_id for j in list(server.jobs.values()) if "consuming" in _stderr(j)]
        if len(ready) >= n:
            return ready
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- job {j.job_id} {j.status}\n{_stderr(j)[-1500:]}" for j in server.jobs.values())
            raise AssertionError(f"{len(ready)} of {n} workers consuming after {timeout} s\n{logs}")
        time.sleep(0.3)


def _stderr(job: object) -> str:
    path = job.workdir / "std.err"  # type: ignore[attr-defined]
    return path.read_text(errors="replace") if path.exists() else ""


def _gone(job: object, timeout: float = 20) -> bool:
    """The job's process and its whole process group (the worker's prefork children) have exited."""
    process = job.process  # type: ignore[attr-defined]
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


def _assert_no_secrets(jdls: list[str], broker_url: str, secret: str) -> None:
    password = urlsplit(broker_url).password or ""
    assert jdls
    for jdl in jdls:
        for value in {password, quote(password, safe=""), secret, quote(secret, safe="")}:
            assert value and value not in jdl, f"{value!r} is in the JDL:\n{jdl}"
        assert "MQEXEC_SECRET" not in jdl and "MQEXEC_BROKER_URL" not in jdl
        assert BOOT_URL_ENV in jdl  # only the bootstrap account, which can do nothing but say hello


def _workers(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path, **kw: object
) -> DiracWorkers:
    options: dict[str, object] = {"sites": [SITE], "cores": 1, "walltime": "1h", "idle_timeout": "10m", **kw}
    return DiracWorkers(
        server.url,
        broker=broker_url,
        bootstrap=RabbitmqctlBootstrap,
        proxy=str(pki.proxy),
        ca_dir=str(pki.ca_dir),
        secret=str(settings["secret"]),
        config=Config.load(queue_prefix=settings["queue_prefix"]),
        command=(sys.executable, "-m", "mqexec"),
        state_file=tmp_path / "state.json",
        **options,
    )  # type: ignore[arg-type]


def _square(x: int) -> tuple[int, str | None]:
    return x * x, os.environ.get("DIRACJOBID")


def _coffea_processor() -> object:
    from coffea import processor

    class CountMuons(processor.ProcessorABC):
        def process(self, events: object) -> dict[str, int]:
            import awkward as ak

            return {"events": len(events), "muons": int(ak.sum(events.NMuon))}  # type: ignore[arg-type,attr-defined]

        def postprocess(self, accumulator: object) -> object:
            return accumulator

    return CountMuons()


def test_contract_scale_run_close(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], client: object, tmp_path: Path
) -> None:
    """Contract test: scale(3) → 3 real workers boot with sealed credentials, a map and a coffea run complete
    on them, close() kills them; the JDL carries neither the broker password nor the signing key."""
    workers = _workers(server, pki, broker_url, settings, tmp_path)
    try:
        workers.scale(3)
        ids = _wait_consuming(server, 3)
        assert workers.keys.answered == 3 and workers.keys.refused == 0

        results = client.gather(client.map(_square, range(300)))  # type: ignore[attr-defined]
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
    _assert_no_secrets(server.jdls, broker_url, str(settings["secret"]))
    assert workers.pool.secrets.user is None  # the bootstrap user was deleted


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
        monkeypatch.setenv(BOOT_URL_ENV, workers.pool._secret_env[BOOT_URL_ENV])
        monkeypatch.setenv("MQEXEC_BOOT_QUEUE", workers.boot_queue)
        monkeypatch.setenv("X509_USER_PROXY", str(pki.stranger_proxy))
        with pytest.raises(BootError, match=r"refused.*mallory"):
            boot(["worker"], timeout=30)
        assert workers.keys.refused == 1
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
    good = answer_hello(hello, alice, str(pki.ca_dir), {"broker_url": "amqp://x", "secret": "k"})
    assert open_reply(good, job, str(pki.ca_dir), "ab" * 16)["secret"] == "k"
    with pytest.raises(BootError, match=r"not valid|signature|mallory|not to"):
        forged = answer_hello({"nonce": "ab" * 16, "chain": mallory.pems()}, mallory, str(pki.ca_dir), {})
        forged["sealed"] = good["sealed"]
        open_reply(forged, job, str(pki.ca_dir), "ab" * 16)
    with pytest.raises(BootError, match="signature"):  # replayed for another hello
        open_reply(good, job, str(pki.ca_dir), "cd" * 16)


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


def test_contract_cli_submit_jobs_kill(
    server: RecordingServer, pki: PKI, broker_url: str, settings: dict[str, object], tmp_path: Path
) -> None:
    """Contract test of the CLI: ``mqexec submit dirac`` / ``mqexec jobs`` / ``mqexec jobs kill --all``."""
    prefix = str(settings["queue_prefix"])
    boot_user = RabbitmqctlBootstrap(
        {"configure": rf"^{prefix}\.boot\..+$", "write": r"^amq\.default$", "read": rf"^{prefix}\.boot\..+$"},
        broker_url,
    )
    boot_url = boot_user.issue()[BOOT_URL_ENV]
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "MQEXEC_SECRET": str(settings["secret"])}
    mqexec = [sys.executable, "-m", "mqexec"]
    submit = subprocess.Popen(
        [
            *mqexec,
            "submit",
            "dirac",
            "--jobs",
            "2",
            "--url",
            server.url,
            "--proxy",
            str(pki.proxy),
            "--ca-dir",
            str(pki.ca_dir),
            "--site",
            "LCG.UKI-SOUTHGRID-RALPP.uk,LCG.UKI-LT2-Brunel.uk",
            "--cores",
            "1",
            "--broker",
            broker_url,
            "--bootstrap",
            boot_url,
            "--walltime",
            "1h",
            "--queue-prefix",
            prefix,
            "--worker-command",
            f"{sys.executable} -m mqexec",
            "--poll",
            "0.5",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_consuming(server, 2)
        table = subprocess.run([*mqexec, "jobs"], env=env, capture_output=True, text=True, timeout=60)
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:3] == ["JOB", "ID", "SITE"]
        rows = [line.split() for line in lines[1:]]
        assert sorted(int(r[0]) for r in rows) == sorted(server.jobs)
        assert all(r[1] == SITE and r[2] == "Running" for r in rows), table.stdout

        kill = subprocess.run([*mqexec, "jobs", "kill", "--all"], env=env, capture_output=True, text=True, timeout=60)
        assert kill.returncode == 0 and "killed 2 job(s)" in kill.stdout, kill.stdout + kill.stderr
        out, _ = submit.communicate(timeout=60)  # it sees every job final and ends
        assert submit.returncode == 0, out
        assert "submitted 2 job(s)" in out and "every job has ended" in out
    finally:
        if submit.poll() is None:
            submit.terminate()
            submit.wait(30)
        boot_user.revoke()
    assert all(_gone(j) for j in server.jobs.values())
    assert {j.status for j in server.jobs.values()} == {"Killed"}
    assert 'Site = {"LCG.UKI-SOUTHGRID-RALPP.uk", "LCG.UKI-LT2-Brunel.uk"}' in server.jdls[0]
    _assert_no_secrets(server.jdls, broker_url, str(settings["secret"]))


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
