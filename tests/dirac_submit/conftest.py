"""Fixtures for dirac_submit tests: a generated grid PKI and the DIRAC Tornado contract server, as v9 and v8.

Every test that takes ``contract_server`` (or ``transport``) runs twice: against the server speaking DIRAC v9
(the default) and DIRAC v8 (``clientSetup`` required, ``getJobsParameters`` still served, ``DIRACJOBID``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dirac_pki import PKI, make_pki
from tornado_contract_server import TornadoContractServer

from dirac_submit import HTTPPolicy, TornadoTransport


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "enabled_dependencies(names): DiracX dependencies a diracx.testing app enables")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=["v9", "v8"])
def dirac_version(request: pytest.FixtureRequest) -> str:
    """The DIRAC version the contract server speaks."""
    return str(request.param)


@pytest.fixture
def contract_server(pki: PKI, tmp_path: Path, dirac_version: str) -> Iterator[TornadoContractServer]:
    with TornadoContractServer(pki, workdir=tmp_path / "jobs", version=dirac_version) as server:
        yield server


@pytest.fixture
def connect(pki: PKI, contract_server: TornadoContractServer) -> Callable[..., TornadoTransport]:
    """``connect(proxy=..., http=...)`` → a TornadoTransport to the contract server (with its setup on v8)."""

    def make(**kwargs: object) -> TornadoTransport:
        options: dict[str, object] = {
            "proxy": str(pki.proxy),
            "ca_dir": str(pki.ca_dir),
            "setup": contract_server.setup,
            "http": HTTPPolicy(timeout=5, retries=1, backoff=0.05),
            **kwargs,
        }
        return TornadoTransport(contract_server.url, **options)  # type: ignore[arg-type]

    return make


@pytest.fixture
def transport(connect: Callable[..., TornadoTransport]) -> TornadoTransport:
    return connect()
