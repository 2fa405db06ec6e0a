"""DiracXTransport against the real DiracX router, served in-process by uvicorn over loopback HTTP.

Uses the ``diracx.testing`` pytest plugin (sqlite databases, no MySQL/OpenSearch). Skipped only
when the optional diracx packages are not importable.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

if importlib.util.find_spec("diracx.testing") is None or importlib.util.find_spec("uvicorn") is None:
    pytest.skip(
        'DiracX is an optional extra: pip install "diracx-routers[testing]" diracx-testing to run these tests',
        allow_module_level=True,
    )

import uvicorn

from dirac_submit import (
    AuthError,
    DiracXTransport,
    HTTPPolicy,
    JobPool,
    JobTemplate,
    ProxyError,
    load_diracx_token,
)

pytest_plugins = ["diracx.testing"]

pytestmark = pytest.mark.enabled_dependencies(
    [
        "AuthSettings",
        "ConfigSource",
        "DevelopmentSettings",
        "JobDB",
        "JobLoggingDB",
        "JobParametersDB",
        "PilotAgentsDB",
        "SandboxMetadataDB",
        "TaskQueueDB",
        "WMSAccessPolicy",
    ]
)


@pytest.fixture
def diracx_url(client_factory) -> Iterator[str]:
    """The configured DiracX app, on a free loopback port, for as long as the test runs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(client_factory.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def token(client_factory) -> str:
    """A normal user's access token, signed like diracx.testing's normal_user client does."""
    from diracx.core.properties import NORMAL_USER
    from diracx.logic.auth.token import _sign_token_payload
    from uuid_utils import uuid7

    payload = {
        "sub": "testingVO:yellow-sub",
        "exp": datetime.now(UTC) + timedelta(minutes=10),
        "iss": "http://lhcbdirac.cern.ch/",
        "dirac_properties": [NORMAL_USER],
        "jti": str(uuid7()),
        "preferred_username": "preferred_username",
        "dirac_group": "test_group",
        "vo": "lhcb",
    }
    return _sign_token_payload(payload, client_factory.test_auth_settings)


def test_diracx_submit_search_kill(diracx_url: str, token: str) -> None:
    dx = DiracXTransport(diracx_url, token=token, http=HTTPPolicy(timeout=10, retries=0))
    assert dx.ping() == {"status": "live"}
    template = JobTemplate(["/bin/true"], name="dx", sites=["LCG.CERN.cern"], environment={"A": "b c"})
    single = dx.submit([template.to_jdl()])
    parametric = dx.submit([template.to_jdl(count=3)])
    ids = single + parametric
    assert len(ids) == 4
    states = dx.status(ids)
    assert sorted(states) == sorted(ids)
    assert {s.status for s in states.values()} <= {"Received", "Submitting", "Checking"}
    assert all(s.since is not None and s.since.tzinfo is not None for s in states.values())

    result = dx.kill([*ids[:2], 987654])
    assert sorted(result.done) == sorted(ids[:2])
    assert result.rejected == [987654]
    assert {dx.status(ids[:2])[i].status for i in ids[:2]} == {"Killed"}


def test_diracx_pool_close_kills_jobs(diracx_url: str, token: str) -> None:
    pool = JobPool(DiracXTransport(diracx_url, token=token), JobTemplate(["/bin/true"]))
    ids = pool.submit(2)
    assert {j.job_id for j in pool.refresh()} == set(ids)
    # Keep a second client: the pool closes its own transport.
    dx = DiracXTransport(diracx_url, token=token)
    pool.close()
    assert {s.status for s in dx.status(ids).values()} == {"Killed"}


def test_diracx_bad_token_is_an_auth_error(diracx_url: str) -> None:
    with pytest.raises(AuthError, match="HTTP 401"):
        DiracXTransport(diracx_url, token="not-a-token").status([1])


def test_diracx_expired_credentials_file(tmp_path) -> None:
    creds = tmp_path / "credentials.json"
    creds.write_text('{"access_token": "x", "refresh_token": null, "expires_on": 1000}')
    with pytest.raises(ProxyError, match="expired at 1970-01-01"):
        load_diracx_token(proxy_path=str(tmp_path / "no-proxy"), credentials_path=str(creds))
