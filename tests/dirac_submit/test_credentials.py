"""RabbitMQUserIssuer against a real RabbitMQ node with the management plugin, started for this module.

The node is private (``tests/rabbit.py``: own ports, data dir, name and cookie; removed even after a killed run),
so the machine's shared broker is untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
from dirac_pki import PKI
from rabbit import PrivateNode
from tornado_contract_server import TornadoContractServer

from dirac_submit import AuthError, JobPool, JobTemplate, RabbitMQUserIssuer

kombu = pytest.importorskip("kombu", reason="kombu (an mqexec core dependency) is needed to log in over AMQP")
from amqp.exceptions import AccessRefused  # noqa: E402  (amqp comes with kombu)


@pytest.fixture(scope="module")
def management() -> Iterator[tuple[str, str]]:
    """(management URL, AMQP URL template) of a private RabbitMQ node with rabbitmq_management."""
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
    node = PrivateNode(management=True)
    try:
        node.start()
        url = f"http://127.0.0.1:{node.management_port}"
        deadline = time.monotonic() + 60
        while True:  # the management listener comes up a moment after AMQP
            assert time.monotonic() < deadline, "the private node's management API did not answer within 60 s"
            try:
                if requests.get(f"{url}/api/overview", auth=("guest", "guest"), timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        yield url, f"amqp://127.0.0.1:{node.amqp_port}/{{vhost}}"
    finally:
        node.remove()


def _users(url: str) -> set[str]:
    return {u["name"] for u in requests.get(f"{url}/api/users", auth=("guest", "guest"), timeout=5).json()}


def test_issued_user_has_least_privilege_and_dies_on_revoke(management: tuple[str, str]) -> None:
    url, amqp = management
    issuer = RabbitMQUserIssuer(
        url,
        admin=("guest", "guest"),
        amqp_url=amqp,
        read="^tasks$",
        write="^tasks$",
        configure="^tasks$",
        env_name="BROKER",
    )
    broker_url = issuer.issue()["BROKER"]
    assert issuer.user in _users(url)
    with kombu.Connection(broker_url) as conn:
        kombu.Queue("tasks", channel=conn.channel()).declare()
        with pytest.raises(AccessRefused, match="ACCESS_REFUSED"):
            kombu.Queue("other", channel=conn.channel()).declare()
    issuer.revoke()
    assert not any(name.startswith("dirac-submit-") for name in _users(url))
    with pytest.raises(AccessRefused):
        kombu.Connection(broker_url).connect()
    issuer.revoke()  # idempotent


def test_wrong_admin_password_is_worded_as_what_it_is(management: tuple[str, str]) -> None:
    """Not a DIRAC proxy problem: the RabbitMQ management API refused the admin login (and no password shows)."""
    url, amqp = management
    issuer = RabbitMQUserIssuer(url, admin=("guest", "not-the-password"), amqp_url=amqp, env_name="BROKER")
    with pytest.raises(AuthError) as info:
        issuer.issue()
    message = str(info.value)
    assert message.startswith(f"the RabbitMQ management API at {url} refused the admin user 'guest' (PUT /api/users/")
    assert message.endswith("wrong user name or password, or the user lacks the 'administrator' tag")
    assert "proxy" not in message and "DIRAC" not in message and "not-the-password" not in message
    assert issuer.user is None and not any(name.startswith("dirac-submit-") for name in _users(url))


def test_pool_puts_only_the_issued_credential_in_the_jdl_and_revokes_it_on_close(
    management: tuple[str, str], pki: PKI, contract_server: TornadoContractServer, connect
) -> None:
    url, amqp = management
    issuer = RabbitMQUserIssuer(url, admin=("guest", "guest"), amqp_url=amqp, env_name="BROKER")
    transport = connect()
    template = JobTemplate(["python3", "-c", "print(__import__('os').environ.get('BROKER'))"])
    pool = JobPool(transport, template, secrets=issuer)
    [job_id] = pool.submit(1)
    job = contract_server.jobs[job_id]
    [entry] = job.attrs["ExecutionEnvironment"]
    issued = unquote(entry.split("=", 1)[1])
    assert issued.startswith(f"amqp://{issuer.user}:")
    assert "guest" not in entry
    deadline = time.monotonic() + 10
    while job.status != "Done":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.stdout().strip() == issued
    pool.close()
    assert not any(name.startswith("dirac-submit-") for name in _users(url))


@pytest.mark.parametrize("dirac_version", ["v9"])
def test_cli_wrong_admin_password_is_one_line_and_not_a_proxy_problem(
    management: tuple[str, str], pki: PKI, contract_server: TornadoContractServer, tmp_path: Path
) -> None:
    """``mqexec submit dirac --management-url``: a wrong admin password is said as that, in one line, exit 2."""
    url, amqp = management
    broker = amqp.replace("amqp://", "amqp://guest:guest@").format(vhost="")  # the private node's AMQP port
    root = Path(__file__).resolve().parents[2]
    argv = [sys.executable, "-m", "mqexec", "submit", "dirac", "--jobs", "1", "--url", contract_server.url]
    argv += ["--proxy", str(pki.proxy), "--ca-dir", str(pki.ca_dir), "--broker", broker]
    argv += ["--management-url", url, "--management-user", "guest", "--queue-prefix", "mqt-wrong-admin"]
    env = {
        **os.environ,
        "MQEXEC_RABBITMQ_ADMIN_PASSWORD": "not-the-password",
        "MQEXEC_SECRET": "k",
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "PYTHONPATH": str(root),
    }
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"mqexec: error: the RabbitMQ management API at {url} refused the admin user 'guest' (PUT "
        + re.search(r"/api/users/mqexec-boot-\d+-[0-9a-f]+", done.stderr).group(0)  # type: ignore[union-attr]
        + "): wrong user name or password, or the user lacks the 'administrator' tag"
    ]
    assert contract_server.jobs == {}
