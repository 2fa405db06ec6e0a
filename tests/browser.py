"""Headless Chromium for tests: load a page as a person would (JavaScript runs), dump its DOM or photograph it.

    page URL ──chromium --headless (fresh profile, no network but the page's)──▶ --dump-dom → the HTML after scripts
                                                                              ──▶ --screenshot → a PNG

Debian's ``chromium`` (``apt-get install chromium``; ``.ci/setup`` installs it). Each call gets a fresh
``--user-data-dir`` and the flags that keep Chromium from calling home, so it talks to the page's server only.
``--virtual-time-budget`` lets the page's timers and XHRs (Flower fills its tables by XHR) finish first.

    html = dump_dom("http://127.0.0.1:5555/tasks", tmp_path)
    png = screenshot("http://127.0.0.1:5555/workers", tmp_path / "workers.png")
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def chromium() -> str:
    """The Chromium binary; the test fails (never skips) with how to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("headless Chromium is not installed: apt-get install chromium", pytrace=False)
    return found


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    with tempfile.TemporaryDirectory(prefix="mqexec-chromium-") as profile:
        done = subprocess.run(
            [chromium(), *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    if done.returncode:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr.decode(errors='replace')[-800:]}")
    return done


def dump_dom(url: str, *, wait_ms: int = 6000, timeout: float = 90.0) -> str:
    """The page's DOM after its scripts ran for ``wait_ms`` of virtual time."""
    return _run([f"--virtual-time-budget={wait_ms}", "--dump-dom", url], timeout).stdout.decode(errors="replace")


def screenshot(url: str, path: Path, *, size: tuple[int, int] = (1400, 900), wait_ms: int = 6000,
               timeout: float = 90.0) -> Path:  # fmt: skip
    """A PNG of the page at ``path`` (window ``size``), after ``wait_ms`` of virtual time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [f"--virtual-time-budget={wait_ms}", f"--window-size={size[0]},{size[1]}", f"--screenshot={path}", url],
        timeout,
    )
    if not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url} to {path}")
    return path
