"""Fixtures for dirac_submit tests: a generated grid PKI and the DIRAC Tornado contract server."""

from __future__ import annotations

from collections.abc import Iterator
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


@pytest.fixture
def contract_server(pki: PKI, tmp_path: Path) -> Iterator[TornadoContractServer]:
    with TornadoContractServer(pki, workdir=tmp_path / "jobs") as server:
        yield server


@pytest.fixture
def transport(pki: PKI, contract_server: TornadoContractServer) -> TornadoTransport:
    return TornadoTransport(
        contract_server.url,
        proxy=str(pki.proxy),
        ca_dir=str(pki.ca_dir),
        http=HTTPPolicy(timeout=5, retries=1, backoff=0.05),
    )
