"""The worker image generator: the base image tag and every pin come from this interpreter's environment.

No container engine runs on the test machines, so the image itself is not built here; what is checked is
that the build inputs say exactly what the client has (Python major.minor, package versions).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from mqexec import image

TAG = f"{sys.version_info.major}.{sys.version_info.minor}"


def _lock(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def test_lock_pins_match_this_environment(tmp_path: Path) -> None:
    image.write(tmp_path)
    pins = _lock((tmp_path / "requirements.lock").read_text())
    for name, version in pins.items():
        assert metadata.version(name) == version, name
    for name in ("celery", "kombu", "cloudpickle", "cryptography"):  # mqexec's runtime, dirac-boot's crypto
        assert pins[name] == metadata.version(name)
    for name in ("coffea", "awkward", "uproot", "numpy", "dask"):  # analysis packages, when present
        try:
            assert pins[name] == metadata.version(name)
        except metadata.PackageNotFoundError:
            assert name not in pins
    assert "mqexec" not in pins  # installed from the same checkout in the image


def test_base_image_is_the_client_python(tmp_path: Path) -> None:
    image.write(tmp_path)
    assert re.search(rf"^FROM python:{re.escape(TAG)}-slim$", (tmp_path / "Containerfile").read_text(), re.M)
    definition = (tmp_path / "mqexec-worker.def").read_text()
    assert re.search(rf"^From: python:{re.escape(TAG)}-slim$", definition, re.M)
    assert "Bootstrap: docker" in definition


def test_extra_package_and_typo(tmp_path: Path) -> None:
    assert image.pins(["pytest"])["pytest"] == metadata.version("pytest")
    with pytest.raises(metadata.PackageNotFoundError):
        image.pins(["no-such-package-mqexec"])


def test_cli_prints_and_files_in_repo_are_consistent() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mqexec.image", "--print", "containerfile"], capture_output=True, text=True, check=True
    ).stdout
    assert f"FROM python:{TAG}-slim" in out
    repo = Path(__file__).resolve().parent.parent / "worker_image"
    for name in ("Containerfile", "mqexec-worker.def", "entrypoint.sh", "requirements.lock"):
        assert (repo / name).exists(), name
    # every file the Containerfile copies exists in the build context (the repository root)
    for src in re.findall(r"^COPY (.+) \S+$", (repo / "Containerfile").read_text(), re.M):
        for path in src.split():
            assert (repo.parent / path).exists(), path
    subprocess.run(["sh", "-n", str(repo / "entrypoint.sh")], check=True)
