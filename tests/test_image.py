"""The worker image generator (``python -m mqexec.image`` / ``mqexec image``) and its entrypoint on the host.

No container engine runs on the test machines, so no image is built here. What is checked: the build context
says exactly what the client has (Python major.minor, package versions, mqexec's own code), it is complete
(every file the recipes copy is in it), the recipe's install command works (run on the host, in a venv), and
the generated ``entrypoint.sh`` starts a real worker that connects to RabbitMQ and runs a task.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

import mqexec
from mqexec import image
from mqexec.errors import ConfigError
from mqexec.keys import Identity

TAG = f"{sys.version_info.major}.{sys.version_info.minor}"
REPO = Path(__file__).resolve().parent.parent


def _lock(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def _image_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqexec.image", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


# ----------------------------------------------------------------------------------------- the recipe
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
    assert "mqexec" not in pins  # its code is copied into the build context instead


def test_base_image_is_the_client_python(tmp_path: Path) -> None:
    image.write(tmp_path)
    assert re.search(rf"^FROM python:{re.escape(TAG)}-slim$", (tmp_path / "Containerfile").read_text(), re.M)
    definition = (tmp_path / "mqexec-worker.def").read_text()
    assert re.search(rf"^From: python:{re.escape(TAG)}-slim$", definition, re.M)
    assert "Bootstrap: docker" in definition


def test_build_context_is_complete_and_carries_this_mqexec(tmp_path: Path) -> None:
    written = image.write(tmp_path)
    assert [p.name for p in written] == [
        "requirements.lock",
        "Containerfile",
        "mqexec-worker.def",
        "entrypoint.sh",
        "mqexec-src",
    ]
    # every file the recipes copy is in the build context
    copied = re.findall(r"^COPY (\S+) \S+$", (tmp_path / "Containerfile").read_text(), re.M)
    files_section = (tmp_path / "mqexec-worker.def").read_text().split("%files\n")[1].split("\n\n")[0]
    copied_def = [line.split()[0] for line in files_section.splitlines()]
    assert copied == copied_def == ["requirements.lock", "mqexec-src", "entrypoint.sh"]
    assert all((tmp_path / src).exists() for src in copied)
    assert os.access(tmp_path / "entrypoint.sh", os.X_OK)
    # the worker gets exactly the mqexec (and dirac_submit) code this client runs, without bytecode
    for name in image.SOURCES:
        package = Path(__import__(name).__file__ or "").parent
        sources = sorted(p.relative_to(package) for p in package.rglob("*.py") if "__pycache__" not in p.parts)
        copy = tmp_path / "mqexec-src" / name
        assert sorted(p.relative_to(copy) for p in copy.rglob("*.py")) == sources
        assert all(filecmp.cmp(package / rel, copy / rel, shallow=False) for rel in sources)
    assert not list((tmp_path / "mqexec-src").rglob("__pycache__"))


def test_rewriting_replaces_its_own_sources_only(tmp_path: Path) -> None:
    image.write(tmp_path)
    stale = tmp_path / "mqexec-src" / "mqexec" / "removed_module.py"
    stale.write_text("")
    image.write(tmp_path)
    assert not stale.exists()  # a module deleted from mqexec does not linger in the next image

    foreign = tmp_path / "other"
    (foreign / "mqexec-src").mkdir(parents=True)
    (foreign / "mqexec-src" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"mqexec-src exists and was not written by `mqexec image`"):
        image.write(foreign)
    assert (foreign / "mqexec-src" / "notes.txt").read_text() == "mine"


def test_extra_package_and_typo(tmp_path: Path) -> None:
    assert image.pins(["pytest"])["pytest"] == metadata.version("pytest")
    with pytest.raises(metadata.PackageNotFoundError):
        image.pins(["no-such-package-mqexec"])
    out = _image_cli("--package", "no-such-package-mqexec", "--out", str(tmp_path / "img"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr == (
        "python -m mqexec.image: error: --package no-such-package-mqexec: not installed here, so there is no "
        "version to pin\n"
    )
    assert not (tmp_path / "img").exists()
    (tmp_path / "a-file").write_text("")
    out = _image_cli("--out", str(tmp_path / "a-file"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith(f"python -m mqexec.image: error: cannot write the image recipe to {tmp_path}/a-file:")
    assert out.stderr.count("\n") == 1


def test_without_packaging_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "packaging.requirements", None)  # as if `packaging` were not installed
    with pytest.raises(ConfigError, match=r"^mqexec image reads requirements with `packaging`: pip install packaging$"):
        image.pins()


def test_python_m_mqexec_image_writes_worker_image_here_and_says_how_to_build(tmp_path: Path) -> None:
    out = _image_cli(cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:5] == [
        f"wrote worker_image/{name}"
        for name in ("requirements.lock", "Containerfile", "mqexec-worker.def", "entrypoint.sh", "mqexec-src")
    ]
    tag = image.image_tag(tmp_path / "worker_image")
    assert re.fullmatch(rf"py{re.escape(TAG)}-[0-9a-f]{{12}}", tag)
    assert lines[5:] == [
        f"build: podman build -t mqexec-worker:{tag} worker_image",
        f"   or: cd worker_image && apptainer build ../mqexec-worker-{tag}.sif mqexec-worker.def",
    ]
    # the tag names the environment: the same again, another one when the pins change
    assert _image_cli(cwd=tmp_path).stdout.splitlines()[5] == lines[5]
    lock = tmp_path / "worker_image" / "requirements.lock"
    lock.write_text(lock.read_text() + "correctionlib==0.0.1\n")
    assert image.image_tag(tmp_path / "worker_image") != tag


def test_print_one_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mqexec.image", "--print", "containerfile"], capture_output=True, text=True, check=True
    ).stdout
    assert out == image.containerfile()
    assert f"FROM python:{TAG}-slim" in out


def test_register_cli_adds_the_image_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """How ``mqexec/cli.py`` wires it: ``register_cli(subparsers)``, then ``args.run(args)``."""
    parser = argparse.ArgumentParser(prog="mqexec")
    image.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["image", "--print", "entrypoint"])
    assert args.run(args) == 0
    assert capsys.readouterr().out == image.entrypoint()
    args = parser.parse_args(["image", "--out", str(tmp_path / "img"), "--package", "pytest"])
    assert args.run(args) == 0
    assert _lock((tmp_path / "img" / "requirements.lock").read_text())["pytest"] == metadata.version("pytest")
    args = parser.parse_args(["image", "--package", "no-such-package-mqexec"])
    with pytest.raises(ConfigError, match="--package no-such-package-mqexec: not installed here"):
        args.run(args)  # cli.main turns it into "mqexec: error: ..." and exit 2


def test_committed_worker_image_is_the_generators_output() -> None:
    committed = REPO / "worker_image"
    assert (committed / "entrypoint.sh").read_text() == image.entrypoint()
    assert os.access(committed / "entrypoint.sh", os.X_OK)
    committed_tag = re.search(r"^FROM python:(\S+)-slim$", (committed / "Containerfile").read_text(), re.M)
    assert committed_tag, "worker_image/Containerfile has no FROM python:<tag>-slim line"
    for name, text in (("Containerfile", image.containerfile()), ("mqexec-worker.def", image.apptainer_def())):
        expected = text.replace(image.python_tag(), committed_tag.group(1))
        assert (committed / name).read_text() == expected, "regenerate worker_image/ with python -m mqexec.image"


# ------------------------------------------------------------------------------------- on this host
def test_install_command_makes_the_copied_mqexec_the_one_imported(tmp_path: Path) -> None:
    """The recipe's install line, with the image's paths swapped for temporary ones, in a fresh venv: the
    copied packages are what ``import mqexec`` finds, and the ``mqexec`` command it writes runs."""
    image.write(tmp_path / "ctx")
    src, bin_dir, venv = tmp_path / "ctx" / "mqexec-src", tmp_path / "bin", tmp_path / "venv"
    bin_dir.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(venv / "bin"), env["PATH"]])

    def run(*argv: str) -> str:  # from tmp_path: python -c would find the checkout's mqexec in /work/main
        return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    run("sh", "-c", image.install_sources(str(src), str(bin_dir)))
    where = run("python", "-c", "import mqexec, dirac_submit; print(mqexec.__file__, dirac_submit.__file__)")
    assert where.split() == [str(src / "mqexec" / "__init__.py"), str(src / "dirac_submit" / "__init__.py")]
    assert "mqexec worker" in run("mqexec", "--help")


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    image.write(tmp_path)
    entry = str(tmp_path / "entrypoint.sh")
    assert subprocess.run([entry, "echo", "as given"], capture_output=True, text=True).stdout == "as given\n"
    assert subprocess.run([entry, "sh", "-c", "exit 3"]).returncode == 3


def test_entrypoint_runs_a_worker_on_the_host(
    tmp_path: Path, broker_url: str, settings: dict[str, object], client: mqexec.Client
) -> None:
    """``docker run IMAGE --broker ... --concurrency 1`` without the container: the generated entrypoint turns
    the options into ``mqexec worker ...``, which connects out to RabbitMQ and runs this client's task."""
    image.write(tmp_path / "ctx")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),  # this interpreter's mqexec
        "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"]),
        "MQEXEC_SECRET": Identity.parse(str(settings["identity"])).trust.token(),
        "MQEXEC_CACHE_DIR": str(tmp_path / "worker-cache"),
        "MQEXEC_LAKE_URL": "",
    }
    log = tmp_path / "worker.log"
    hostname = f"entrypoint-{settings['queue_prefix']}@test"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [
                str(tmp_path / "ctx" / "entrypoint.sh"),
                "--broker",
                broker_url,
                "--concurrency",
                "1",
                "--hostname",
                hostname,
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "consuming" not in log.read_text(errors="replace"):
            assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no worker after 60 s:\n{log.read_text()}"
            time.sleep(0.2)
        assert client.submit(lambda x: x + 1, 41).result(timeout=60) == 42
        # the entrypoint exec'd mqexec: the task ran in a pool process of the very process we started
        assert client.submit(os.getppid, pure=False).result(timeout=60) == worker.pid
        while "ran getppid()" not in log.read_text(errors="replace"):  # the task is over, not just its result
            assert time.monotonic() < deadline + 60, log.read_text()
            time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)  # what `docker stop` does: SIGTERM to PID 1, the exec'd mqexec
        assert worker.wait(60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
