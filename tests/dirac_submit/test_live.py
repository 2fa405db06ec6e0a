"""Live smoke test against a real DIRAC HTTPS server: ping → submit /bin/true → status → kill.

Run it with your own credentials::

    DIRAC_URL=https://dirac.example.org:8443 X509_USER_PROXY=/tmp/x509up_u$(id -u) \\
    X509_CERT_DIR=/etc/grid-security/certificates python -m pytest tests/dirac_submit -m live
"""

from __future__ import annotations

import os

import pytest

from dirac_submit import JobTemplate, TornadoTransport

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (os.environ.get("DIRAC_URL") and os.environ.get("X509_USER_PROXY")),
        reason="live DIRAC test: set DIRAC_URL=https://host:8443 and X509_USER_PROXY (and X509_CERT_DIR), "
        "then run: python -m pytest tests/dirac_submit -m live",
    ),
]


def test_live_ping_submit_status_kill() -> None:
    dirac = TornadoTransport(os.environ["DIRAC_URL"])
    assert "version" in dirac.ping()
    [job_id] = dirac.submit([JobTemplate(["/bin/true"], name="dirac_submit-smoke").to_jdl()])
    try:
        state = dirac.status([job_id])[job_id]
        assert state.status
    finally:
        dirac.kill([job_id])
    dirac.close()
