"""Real data-lake servers for the lake tests: an XRootD server (root://) and a wsgidav server over TLS (davs://).

Each server exports a directory on this machine, so a test can also look at (and damage) what landed on
storage. Missing software makes the fixture FAIL with the install line; it never skips.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

XROOTD_INSTALL = "xrootd not found: apt-get install xrootd-server xrootd-client"


@dataclass
class LakeServer:
    """A running lake server: ``url`` of its exported root and ``local_dir``, the same place on disk."""

    url: str
    local_dir: str
    auth: tuple[str, str] | None = None
    cafile: str | None = None
    ca_dir: str | None = None  #: the CA as a hashed directory, for ``X509_CERT_DIR``
    token: str | None = None  #: the bearer token it accepts (bearer-token servers)

    def storage_options(self) -> dict[str, Any]:
        """Options for ``Lake(url, **options)``; built fresh, so a child process can call it too."""
        opts: dict[str, Any] = {}
        if self.auth:
            opts["auth"] = self.auth
        if self.cafile:
            opts["verify"] = ssl.create_default_context(cafile=self.cafile)
        return opts


def put_from_child(url: str, server: LakeServer, data: bytes, barrier: Any, results: Any) -> None:
    """Run in a separate process: wait for the others, then ``put`` the same bytes; report ref or error."""
    try:
        from mqexec.lake import Lake

        lake = Lake(url, **server.storage_options())
        barrier.wait(30)
        results.put(lake.put(data).to_dict())
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(proc: subprocess.Popen, port: int, log: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    with open(log, errors="replace") as f:
        tail = f.read()[-2000:]
    pytest.fail(f"server on port {port} did not come up (exit {proc.poll()}); log:\n{tail}", pytrace=False)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def xrootd_server() -> Iterator[LakeServer]:
    """``xrootd -R nobody`` on a free loopback port exporting a fresh directory (owned by nobody)."""
    binary = shutil.which("xrootd")
    if binary is None:
        pytest.fail(XROOTD_INSTALL, pytrace=False)
    try:
        import fsspec_xrootd  # noqa: F401
    except ImportError:
        pytest.fail("fsspec-xrootd not importable: pip install fsspec-xrootd xrootd", pytrace=False)
    top = tempfile.mkdtemp(prefix="mqexec-xrootd-")
    export, admin = os.path.join(top, "export"), os.path.join(top, "admin")
    os.makedirs(export)
    os.makedirs(admin)
    nobody = pwd.getpwnam("nobody")
    for d in (top, export, admin):
        os.chown(d, nobody.pw_uid, nobody.pw_gid)
        os.chmod(d, 0o755)
    port = free_port()
    cfg = os.path.join(top, "xrootd.cfg")
    with open(cfg, "w") as f:
        f.write(f"xrd.port {port}\nall.export {export}\nall.adminpath {admin}\nall.pidpath {admin}\n")
    log = os.path.join(top, "xrootd.log")
    proc = subprocess.Popen(
        [binary, "-R", "nobody", "-c", cfg, "-l", log, "-n", f"mqexec{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_listening(proc, port, log)
        yield LakeServer(f"root://127.0.0.1:{port}/{export}", export)
    finally:
        _stop(proc)
        shutil.rmtree(top, ignore_errors=True)


def _self_signed(top: str) -> tuple[str, str]:
    cert, key = os.path.join(top, "cert.pem"), os.path.join(top, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class BearerGate:
    """WSGI middleware in front of wsgidav: only ``Authorization: Bearer <token>`` gets through (401 else),
    as a token-protected grid storage endpoint answers."""

    def __init__(self, application: Any, token: str) -> None:
        self.application, self.expected = application, f"Bearer {token}"

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("HTTP_AUTHORIZATION") != self.expected:
            body = b"a valid bearer token is required"
            start_response("401 Unauthorized", [("WWW-Authenticate", "Bearer"), ("Content-Length", str(len(body)))])
            return [body]
        return self.application(environ, start_response)


def _wsgidav(name: str, auth: dict[str, Any], token: str | None) -> Iterator[LakeServer]:
    """A wsgidav server over TLS on loopback exporting a fresh directory; ``token``: behind a BearerGate."""
    try:
        import webdav4  # noqa: F401
        import wsgidav  # noqa: F401
    except ImportError:
        pytest.fail("WebDAV test stack missing: pip install wsgidav cheroot webdav4", pytrace=False)
    if shutil.which("openssl") is None:
        pytest.fail("openssl not found: apt-get install openssl", pytrace=False)
    import json

    top = tempfile.mkdtemp(prefix=f"mqexec-{name}-")
    export = os.path.join(top, "export")
    os.makedirs(export)
    cert, key = _self_signed(top)
    ca_dir = os.path.join(top, "ca")
    os.makedirs(ca_dir)
    shutil.copy(cert, ca_dir)
    subprocess.run(["openssl", "rehash", ca_dir], check=True, capture_output=True)
    port = free_port()
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "provider_mapping": {"/": export},
        "ssl_certificate": cert,
        "ssl_private_key": key,
        "verbose": 1,
        "logging": {"enable_loggers": []},
        **auth,
    }
    if token:
        config["middleware_stack"] = [
            "wsgidav.error_printer.ErrorPrinter",
            {"class": "lake_servers.BearerGate", "kwargs": {"application": "${application}", "token": token}},
            "wsgidav.http_authenticator.HTTPAuthenticator",
            "wsgidav.request_resolver.RequestResolver",
        ]
    cfg = os.path.join(top, "wsgidav.json")
    with open(cfg, "w") as f:
        json.dump(config, f)
    log = os.path.join(top, "wsgidav.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    with open(log, "wb") as logf:
        cmd = [sys.executable, "-m", "wsgidav.server.server_cli", "-c", cfg]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_listening(proc, port, log)
        basic = auth.get("simple_dc", {}).get("user_mapping", {}).get("*", {})
        user = next(iter(basic.items()), None) if isinstance(basic, dict) else None
        yield LakeServer(
            f"davs://127.0.0.1:{port}", export, auth=(user[0], user[1]["password"]) if user else None,
            cafile=cert, ca_dir=ca_dir, token=token,
        )  # fmt: skip
    finally:
        _stop(proc)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="session")
def webdav_server() -> Iterator[LakeServer]:
    """wsgidav (cheroot, TLS with a throw-away certificate, basic auth ``lake``/``secret``) on loopback."""
    yield from _wsgidav(
        "webdav",
        {
            "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
            "simple_dc": {"user_mapping": {"*": {"lake": {"password": "secret"}}}},
        },
        None,
    )


@pytest.fixture(scope="session")
def webdav_token_server() -> Iterator[LakeServer]:
    """wsgidav over TLS that lets in only requests with ``Authorization: Bearer <server.token>``."""
    yield from _wsgidav(
        "webdav-token",
        {"simple_dc": {"user_mapping": {"*": True}}, "http_authenticator": {"accept_digest": False,
                                                                          "default_to_digest": False}},
        "tok-" + secrets.token_hex(16),
    )  # fmt: skip
