"""Unit tests: no broker, no subprocess, no network — and they run before everything else.

Every test here gets an empty ``MQEXEC_*`` environment and its own ``XDG_*`` folders (so a config or key file of
the machine never leaks in, and nothing is written into ``~``). A test that tries to open a network connection
or start a process fails at once, naming what it tried: such a test belongs in ``tests/``, not here.

In a run that also collects the integration tests (``python -m pytest``), the unit tests are moved to the front,
so a broken envelope or config fails in seconds instead of after the broker tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests first (stable: the order within each group is kept)."""
    items.sort(key=lambda item: not item.path.is_relative_to(_HERE))


def _refuse(what: str) -> Any:
    def refused(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(f"a unit test tried to {what}; unit tests use no broker, network or subprocess")

    return refused


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("MQEXEC_"):
            monkeypatch.delenv(name)
    for name in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setattr(socket.socket, "connect", _refuse("open a network connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse("open a network connection"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process"))
