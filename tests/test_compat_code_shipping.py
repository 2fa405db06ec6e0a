"""The analysis's own modules reach the workers, and executors share one embedded cluster (issue 11).

A script (``tests/compat_pkg/notebook.py``) imports its helpers from a sibling package installed nowhere
(``tests/compat_pkg``), as an AGC notebook imports its local ``utils/``. Both are copied into a fresh folder and
the script is started from *another* folder, with no ``PYTHONPATH``: only the client's ``sys.path`` (the
script's folder) can import the package. The same script runs on

- ``distributed``: a ``LocalCluster`` (its spawned worker processes are given the client's ``sys.path``);
- ``mqexec-embedded``: ``mqexec.Client()`` with no broker configured;
- ``mqexec-broker``: real ``mqexec worker`` processes started in an empty folder with an empty ``PYTHONPATH``.

and must print the same values. ``test_never_closed_executors_share_one_embedded_cluster`` is mqexec-only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PACKAGE = Path(__file__).parent / "compat_pkg"
EXPECTED = {
    "sums": [80.0, 26.0, 0],
    "outputs": [{"n": 3, "sum": 160.0}, {"n": 1, "sum": 52.0}, {"n": 1, "sum": 0.0}],
}


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``PYTHONPATH`` and mqexec settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MQEXEC_")}
    return {**env, **extra}


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"exit code {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout.splitlines()[-1]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["distributed", "mqexec-embedded", "mqexec-broker"])
def test_sibling_module_reaches_the_workers_from_another_folder(
    where: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysis, elsewhere = tmp_path / "analysis", tmp_path / "elsewhere"
    shutil.copytree(PACKAGE, analysis / "compat_pkg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PACKAGE / "notebook.py", analysis / "notebook.py")
    elsewhere.mkdir()
    env = _clean_env()
    target = {"distributed": "distributed", "mqexec-embedded": "embedded"}.get(where, "")
    if where == "mqexec-broker":
        settings: dict[str, Any] = request.getfixturevalue("settings")
        empty = tmp_path / "empty"
        empty.mkdir()
        monkeypatch.chdir(empty)  # the worker process starts (and stays) in an empty folder
        request.getfixturevalue("start_worker")(env={"PYTHONPATH": ""})
        target = request.getfixturevalue("broker_url")
        env.update({f"MQEXEC_{k.upper()}": str(v) for k, v in settings.items()})
    out = _run([str(analysis / "notebook.py"), target], elsewhere, env)
    assert json.loads(out) == EXPECTED


_THREE_EXECUTORS = """
import json
import psutil
from coffea.processor.executor import WorkItem
from mqexec import MQExecutor

def local_workers():
    return [p for p in psutil.Process().children(recursive=True) if {"mqexec", "worker"} <= set(p.cmdline())]

items = [WorkItem("ttbar", f"file{i}.root", "Events", 0, 10 * (i + 1), f"uuid-{i}") for i in range(3)]
executors, counts = [], []
for _ in range(3):
    executor = MQExecutor(status=False)  # never closed, as in a notebook that makes one per cell
    executors.append(executor)
    out, error = executor(items, lambda item: {"entries": item.entrystop - item.entrystart}, {})
    assert (out, error) == ({"entries": 60}, 0), (out, error)
    counts.append(len(local_workers()))
print(json.dumps(counts))
"""


@pytest.mark.timeout(180)
def test_never_closed_executors_share_one_embedded_cluster(tmp_path: Path) -> None:
    """mqexec-only by nature: distributed has no executor that starts its own cluster. Three ``MQExecutor()``
    left open in one process run on one embedded cluster: the local worker processes (counted with psutil
    after each executor ran) are as many after the third as after the first."""
    counts = json.loads(_run(["-c", _THREE_EXECUTORS], tmp_path, _clean_env()))
    assert counts[0] >= 1 and counts == [counts[0]] * 3, f"local worker processes after each executor: {counts}"
