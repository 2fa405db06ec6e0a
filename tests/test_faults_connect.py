"""Issue 9, cases 10 and 11: connecting right or failing clearly. TLS to a private node with a test CA — the
client and the worker verify the server's certificate and name, a wrong CA or host is one clear BrokerError within
seconds, a client certificate logs in with EXTERNAL; and malformed broker URLs are one ConfigError sentence without
the password."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rabbit import TlsBrokers, TlsPki, connection_traffic, fixture_rabbit_tls  # noqa: F401 - the rabbit_tls fixture
from reliability_log import record
from workerproc import ROOT, Worker

import mqexec
from mqexec.keys import Identity


def _tls(pki: TlsPki, *, cert: bool = False, ca: Path | None = None) -> dict[str, Any]:
    settings: dict[str, Any] = {"tls_ca": str(ca or pki.ca)}
    if cert:
        settings |= {"tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key)}
    return settings


def _env(settings: dict[str, Any]) -> dict[str, str]:
    return {f"MQEXEC_{name.upper()}": str(value) for name, value in settings.items()}


def test_amqps_client_and_worker_verify_the_broker(
    rabbit_tls: TlsBrokers, settings: dict[str, Any], start_worker: Callable[..., Worker]
) -> None:
    pki, node = rabbit_tls.pki, rabbit_tls.node
    url = node.url(tls=True)
    start_worker("--concurrency", "1", broker=url, env=_env(_tls(pki)))
    with mqexec.Client(url, **settings, **_tls(pki)) as client:
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    # a client certificate: EXTERNAL login as the certificate's CN, no password anywhere
    external = node.url(user=None, tls=True)
    start_worker("--concurrency", "1", broker=external, env=_env(_tls(pki, cert=True)))
    with mqexec.Client(external, **settings, **_tls(pki, cert=True)) as client:
        users = {c.user for c in connection_traffic(node)}
        assert client.submit(sum, [4, 5]).result(timeout=60) == 9
    assert pki.client_cn in users, users


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong CA", r"is not signed by a CA in .*wrong-ca\.pem .*set tls_ca \(MQEXEC_TLS_CA\)"),
        ("wrong host", r"is not issued for host '127\.0\.0\.1'"),
        ("plain port", r"does not speak TLS .*amqps:// needs the broker's TLS port"),
        ("missing client certificate", r"the client certificate .*/none does not exist"),
    ],
)
def test_amqps_failures_are_one_clear_broker_error_within_seconds(
    rabbit_tls: TlsBrokers, case: str, expected: str, tmp_path: Path
) -> None:
    pki, node = rabbit_tls.pki, rabbit_tls.node
    url, tls = {
        "wrong CA": (node.url(tls=True), _tls(pki, ca=pki.wrong_ca)),
        "wrong host": (rabbit_tls.wrong_host.url(tls=True), _tls(pki)),
        "plain port": (node.url().replace("amqp://", "amqps://"), _tls(pki)),
        "missing client certificate": (node.url(user=None, tls=True), {**_tls(pki), "tls_cert": f"{tmp_path}/none"}),
    }[case]
    identity = Identity.new()
    started = time.monotonic()
    with pytest.raises(mqexec.BrokerError, match=expected) as failed:
        mqexec.Client(url, identity=identity.text(), **tls)
    took = time.monotonic() - started
    assert took < 15 and "\n" not in str(failed.value)
    # the worker says the same, in one line, and exits with code 2
    proc = subprocess.run(
        [sys.executable, "-m", "mqexec", "worker", "--broker", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **_env(tls), "MQEXEC_SECRET": identity.trust.token(), "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert "mqexec: error:" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    print(f"\namqps {case}: {failed.value} (after {took:.2f} s)")
    if case == "wrong CA":
        record(
            "10",
            "amqps:// with a wrong CA or a certificate for another host",
            f"`BrokerError`: {failed.value}",
            recover_s=took,
            lost=0,
            twice=0,
        )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp:guest:SECRET@127.0.0.1:5672", "lacks '//' after 'amqp:'"),
        ("amqp://guest:SECRET@127.0.0.1:notaport//", "has port 'notaport': not a number from 1 to 65535"),
        ("amqp://guest:SECRET@127.0.0.1:99999//", "has port '99999': not a number from 1 to 65535"),
        ("amqp://guest:SECRET@127.0.0.1:5672//;amqp:guest:SECRET@h:1", "lacks '//' after 'amqp:'"),
    ],
)
def test_client_bad_urls_are_one_config_error_sentence_without_the_password(url: str, expected: str) -> None:
    started = time.monotonic()
    with pytest.raises(mqexec.ConfigError) as bad:
        mqexec.Client(url, identity=Identity.new().text())
    text = str(bad.value)
    assert expected in text and "SECRET" not in text and "\n" not in text, text
    chained = bad.value.__cause__ or (None if bad.value.__suppress_context__ else bad.value.__context__)
    assert chained is None, repr(chained)  # no second traceback to read (nor a password in it)
    assert time.monotonic() - started < 5
    if "notaport" in url:
        record("11", "malformed broker URLs (`amqp:user:pw@host`, `:notaport`, `:99999`)", f"`ConfigError`: {text}",
               recover_s=None, lost=0, twice=0)  # fmt: skip


def test_a_silent_failover_broker_costs_connect_timeout_once(broker_url: str) -> None:
    """A failover list whose first broker accepts TCP but never answers (a hung node): the first connect waits
    ``connect_timeout`` for it, later ones go to the broker that answered."""
    import socket

    from mqexec.broker import connect
    from mqexec.config import Config

    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody ever speaks AMQP
        cfg = Config.load(broker_url=f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}//;{broker_url}",
                          connect_timeout=4)  # fmt: skip
        took = []
        for _ in range(3):
            started = time.monotonic()
            connect(cfg).release()
            took.append(time.monotonic() - started)
    assert took[0] >= 4 and max(took[1:]) < 3, took
