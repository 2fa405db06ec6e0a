"""``mqexec doctor`` against real brokers: a healthy set-up, a wrong password, an unreachable host, a broker that
refuses big messages and a user without permissions on the prefix (private nodes), TLS with a real PKI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from netutil import free_port
from rabbit import fixture_rabbit_node, fixture_rabbit_tls, max_message_size  # noqa: F401

from mqexec.keys import load_identity


def _doctor(broker: str, env: dict[str, str], *args: str) -> tuple[int, list[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mqexec", "doctor", "--broker", broker, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stderr == "", done.stderr
    return done.returncode, done.stdout.splitlines(), time.monotonic() - started


def _line(lines: list[str], name: str) -> str:
    found = [line for line in lines if line[2:].startswith(f"{name}:")]
    assert len(found) == 1, (name, lines)
    return found[0]


def _env(prefix: str, tmp_path: Path, **more: str) -> dict[str, str]:
    key = tmp_path / "config" / "key"
    load_identity(key)  # 0600 in a 0700 directory
    return {"MQEXEC_QUEUE_PREFIX": prefix, "MQEXEC_KEY_FILE": str(key), "MQEXEC_LAKE_URL": "", **more}


def test_healthy_setup_passes_every_check(broker_url: str, prefix: str, start_worker: Any, tmp_path: Path) -> None:
    start_worker("--concurrency", "1", env={"DIRACSITE": "LCG.Example.org"})
    lake = tmp_path / "lake"
    lake.mkdir()
    env = _env(prefix, tmp_path, MQEXEC_LAKE_URL=f"file://{lake}")
    code, lines, _ = _doctor(broker_url, env, "--chunk-time", "2h", "--result-size", "1000")
    assert code == 0, lines
    for name in ("reachable", "TLS", "login", "vhost", "task queue", "quorum queues", "permissions", "message size",
                 "workers", "clock", "results", "lake", "key"):  # fmt: skip
        assert _line(lines, name).startswith("✓"), lines
    assert "1 serve this client's environment" in _line(lines, "workers")
    assert "1 at LCG.Example.org" in _line(lines, "workers")
    assert "a probe of 8.0 MiB was taken" in _line(lines, "message size")
    assert _line(lines, "consumer_timeout").startswith("? consumer_timeout: unknown")
    assert "chunks of 2 h 0 min are not cut off" in _line(lines, "consumer_timeout")
    assert "mode 0600" in _line(lines, "key")
    assert lines[-1] == "nothing blocks a run"
    assert list(lake.joinpath("doctor").iterdir()) == []  # the probe object was deleted


def test_wrong_password_is_one_line_without_the_password(broker_url: str, prefix: str, tmp_path: Path) -> None:
    wrong = broker_url.replace("guest:guest@", "guest:Sup3rSecret@", 1)
    assert wrong != broker_url
    code, lines, took = _doctor(wrong, _env(prefix, tmp_path))
    assert code == 1
    assert _line(lines, "reachable").startswith("✓")
    assert _line(lines, "login") == (
        f"✗ login: broker {wrong.replace('Sup3rSecret', '***')} refused the login of user 'guest': wrong user name "
        "or password"
    )
    assert "Sup3rSecret" not in "\n".join(lines)
    assert not [line for line in lines if line[2:].startswith(("quorum", "permissions", "workers"))]
    assert lines[-1] == "1 problem(s) block a run"
    assert took < 30


def test_unreachable_host_fails_in_seconds(prefix: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    code, lines, took = _doctor(f"amqp://guest:guest@127.0.0.1:{port}//", _env(prefix, tmp_path))
    assert code == 1
    assert _line(lines, "reachable") == (
        f"✗ reachable: nothing accepts connections at 127.0.0.1:{port} (amqp://guest:***@127.0.0.1:{port}//): is the "
        "broker running, and is the port right?"
    )
    assert _line(lines, "key").startswith("✓")  # the checks that need no broker still run
    assert took < 30


def test_a_readable_key_file_blocks_a_run(broker_url: str, prefix: str, tmp_path: Path) -> None:
    env = _env(prefix, tmp_path)
    os.chmod(env["MQEXEC_KEY_FILE"], 0o644)
    code, lines, _ = _doctor(broker_url, env)
    assert code == 1
    assert _line(lines, "key") == (
        f"✗ key: the signing key file {env['MQEXEC_KEY_FILE']} can be read by other users (mode 0644); it must be "
        f"private: run `chmod 600 {env['MQEXEC_KEY_FILE']}`"
    )


def test_small_max_message_size_and_missing_permissions(rabbit_node: Any, tmp_path: Path) -> None:
    node = rabbit_node(max_message_size(1 << 20))
    env = _env("ana", tmp_path)
    code, lines, _ = _doctor(node.url(), env)
    assert code == 1
    size = _line(lines, "message size")
    assert size.startswith("✗ message size: the broker refuses messages over 1.0 MiB (max_message_size)")
    assert f"MQEXEC_PIECE_SIZE={(1 << 20) - 64 * 1024}" in size
    node.add_user("bob", "pw")
    node.set_permissions("bob", configure="^other\\.", write="^other\\.", read="^other\\.")
    code, lines, _ = _doctor(node.url("bob", "pw"), env)
    assert code == 1
    assert _line(lines, "login").startswith("✓")
    assert _line(lines, "permissions").startswith("✗ permissions: cannot declare queue ana.doctor-")
    assert "ACCESS_REFUSED" in _line(lines, "permissions")


def test_tls_certificate_and_its_expiry(rabbit_tls: Any, tmp_path: Path) -> None:
    env = _env("ana", tmp_path, MQEXEC_TLS_CA=str(rabbit_tls.pki.ca))
    code, lines, _ = _doctor(rabbit_tls.node.url(tls=True), env)
    assert _line(lines, "TLS").startswith("✓ TLS: certificate of 127.0.0.1 trusted (issuer mqexec test CA), valid")
    assert code == 0, lines
    code, lines, _ = _doctor(rabbit_tls.node.url(tls=True), {**env, "MQEXEC_TLS_CA": str(rabbit_tls.pki.wrong_ca)})
    assert code == 1
    assert _line(lines, "TLS").startswith("✗ TLS: the TLS certificate of 127.0.0.1:")
    assert "is not signed by a CA in" in _line(lines, "TLS")


def test_one_failover_broker_down_is_a_warning(broker_url: str, prefix: str, tmp_path: Path) -> None:
    port = free_port()
    code, lines, _ = _doctor(f"amqp://guest:guest@127.0.0.1:{port}//;{broker_url}", _env(prefix, tmp_path))
    reachable = [line for line in lines if line[2:].startswith("reachable:")]
    assert reachable[0].startswith("✓ reachable: ") and reachable[1].startswith(
        f"! reachable: nothing accepts connections at 127.0.0.1:{port}"
    )
    assert code == 0, lines
