"""MQExecutor(cache=...) and (save=...) with real workers and a real XRootD / WebDAV lake.

Executions are counted on the workers: the processor appends one line per chunk it processes to a file,
and the workers' logs name every preprocessing task they ran — never by counting cache lookups.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from lake_servers import LakeServer, free_port, webdav_server, webdav_token_server, xrootd_server
from test_coffea import assert_same_histograms

from mqexec.lake import Lake

coffea_processor = pytest.importorskip("coffea.processor")
from coffea.nanoevents import NanoAODSchema  # noqa: E402

__all__ = ["webdav_server", "webdav_token_server", "xrootd_server"]  # fixtures used by name below

ROOT = Path(__file__).resolve().parent.parent
CHUNKSIZE = 5_000

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module


def _load_agc() -> Any:
    spec = importlib.util.spec_from_file_location("agc_ttbar", ROOT / "docs" / "examples" / "agc_ttbar.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["agc_ttbar"] = module
    spec.loader.exec_module(module)
    module._ship_processor_by_value()
    return module


agc = _load_agc()


_TtbarAnalysis: Any = agc.TtbarAnalysis  # loaded from a file: a class mypy cannot see


class CountingTtbar(_TtbarAnalysis):
    """The AGC processor; appends ``<file> <entrystart>`` to ``log`` for every chunk it processes."""

    def __init__(self, log: str, variant: str = "") -> None:
        super().__init__()
        self.log = log
        self.variant = variant

    def process(self, events: Any) -> Any:
        out = super().process(events)
        meta = events.metadata
        with open(self.log, "a") as f:
            f.write(f"{os.path.basename(meta['filename'])} {meta['entrystart']}\n")
        return out


class SkimmingTtbar(CountingTtbar):
    """Also writes each chunk's number of events to the lake with ``open_output``."""

    def process(self, events: Any) -> Any:
        import mqexec.lake

        out = super().process(events)
        with mqexec.lake.open_output("skims/chunk_{n}.txt", "wb") as f:
            f.write(f"{events.metadata['entrystart']} {len(events)}".encode())
        out["skims"] = {f.url: len(events)}
        return out


# -------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def fileset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 processes x 2 files x 10,000 events: 12 chunks of 5,000."""
    return agc.build_fileset(tmp_path_factory.mktemp("agc"), n_files=2, events_per_file=10_000)


@pytest.fixture(scope="module")
def reference(fileset: dict) -> dict:
    return _run(fileset, coffea_processor.IterativeExecutor(status=False), agc.TtbarAnalysis())


def _run(fileset: dict, executor: Any, processor: Any) -> dict:
    runner = coffea_processor.Runner(executor=executor, schema=NanoAODSchema, chunksize=CHUNKSIZE, metadata_cache={})
    previous = NanoAODSchema.warn_missing_crossrefs
    try:
        return runner(fileset, processor_instance=processor, treename="Events")
    finally:
        NanoAODSchema.warn_missing_crossrefs = previous


def _executions(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _metadata_tasks(workers: list[Any]) -> int:
    """Preprocessing calls the workers ran, from their ``ran <label> [+N more]`` log lines."""
    n = 0
    for w in workers:
        for m in re.finditer(r"ran \S+ \(get_metadata\)(?: \+(\d+) more)?", w.text()):
            n += 1 + int(m.group(1) or 0)
    return n


def assert_identical(out: dict, ref: dict) -> None:
    """A cached (or resumed) run gives the output of a run that computed every chunk, to the last bit's noise."""
    assert_same_histograms(out, ref, rtol=1e-12)


def _private_copy(fileset: dict, directory: Path) -> dict:
    import shutil

    directory.mkdir()
    copy = {}
    for name, entry in fileset.items():
        files = {shutil.copy(path, directory): tree for path, tree in entry["files"].items()}
        copy[name] = entry | {"files": files}
    return copy


def _records(local_dir: str) -> dict[str, list[str]]:
    """``{namespace: [record keys]}`` as they lie on the server's disk (no temporary files)."""
    top = Path(local_dir) / "cache"
    return {ns.name: sorted(p.name for p in ns.iterdir() if p.name != "_about") for ns in top.iterdir()}


# ---------------------------------------------------------------------------------------------- tests
def test_rerun_runs_nothing_processor_and_file_changes_rerun(
    fileset, reference, client, start_worker, xrootd_server: LakeServer, tmp_path
) -> None:
    from mqexec import MQExecutor

    workers = [start_worker("--concurrency", "2", "--loglevel", "INFO")]
    cache = f"{xrootd_server.url}/{tmp_path.name}"
    log = tmp_path / "executions.log"
    fileset = _private_copy(fileset, tmp_path / "agc")  # one of its files is replaced below

    first = _run(fileset, MQExecutor(client=client, cache=cache, status=False), CountingTtbar(str(log)))
    assert len(_executions(log)) == 12 and len(set(_executions(log))) == 12
    assert _metadata_tasks(workers) == 6
    assert_identical(first, reference)
    records = _records(os.path.join(xrootd_server.local_dir, tmp_path.name))
    chunk_ns = [ns for ns in records if ns.startswith("coffea-chunks-CountingTtbar-")]
    meta_ns = [ns for ns in records if ns.startswith("coffea-metadata-")]
    assert len(chunk_ns) == 1 and len(records[chunk_ns[0]]) == 12 and len(records[meta_ns[0]]) == 6

    # the same analysis again, in a new Runner: nothing runs on the workers, the same output
    again = _run(fileset, MQExecutor(client=client, cache=cache, status=False), CountingTtbar(str(log)))
    assert len(_executions(log)) == 12  # no chunk ran
    assert _metadata_tasks(workers) == 6  # no preprocessing ran
    assert_identical(again, first)
    assert again["nevents"] == first["nevents"]

    # another processor state: every chunk runs again (preprocessing is still cached)
    log.unlink()
    changed = _run(fileset, MQExecutor(client=client, cache=cache, status=False), CountingTtbar(str(log), "v2"))
    assert len(_executions(log)) == 12
    assert _metadata_tasks(workers) == 6
    assert_identical(changed, reference)

    # one file replaced (same events, written again): only its 2 chunks and its preprocessing run
    log.unlink()
    replaced = fileset["ttbar__nominal"]["files"]
    path = next(iter(replaced))
    data = Path(path).read_bytes()
    os.unlink(path)
    from synthetic import write_nanoaod

    write_nanoaod(path, 10_000, seed=0, process="ttbar")  # a new file: new UUID, new mtime
    assert Path(path).read_bytes() != data
    after = _run(fileset, MQExecutor(client=client, cache=cache, status=False), CountingTtbar(str(log), "v2"))
    assert sorted(_executions(log)) == [f"{os.path.basename(path)} 0", f"{os.path.basename(path)} 5000"]
    assert _metadata_tasks(workers) == 7
    assert after["nevents"] == changed["nevents"]


def test_corrupt_record_is_ignored_and_rewritten_outputs_and_save(
    fileset, reference, broker_url, settings, start_worker, xrootd_server: LakeServer, tmp_path
) -> None:
    import mqexec
    from mqexec import MQExecutor
    from mqexec.outputs import load_output

    start_worker("--concurrency", "2")
    cache = f"{xrootd_server.url}/{tmp_path.name}/cache"
    lake = f"{xrootd_server.url}/{tmp_path.name}/lake"
    saved = f"{xrootd_server.url}/{tmp_path.name}/out/agc.coffea"
    log = tmp_path / "executions.log"
    with mqexec.Client(broker_url, lake_url=lake, **settings) as client:
        first = _run(fileset, MQExecutor(client=client, cache=cache, save=saved, status=False), SkimmingTtbar(str(log)))
        # open_output: one file per chunk, straight from the workers, named by the chunk, at the URL it reported
        skims = first.pop("skims")
        assert len(skims) == 12 and sum(skims.values()) == sum(reference["nevents"].values())
        on_disk = Path(xrootd_server.local_dir, tmp_path.name, "lake", "skims")
        assert sorted(p.name for p in on_disk.iterdir()) == sorted(u.rsplit("/", 1)[1] for u in skims)
        assert all(u.startswith(lake + "/skims/chunk_") for u in skims)
        # save=: the merged output, as coffea.util.save writes it
        assert_identical(load_output(saved), reference)
        from coffea.util import load

        assert_identical(load(saved), reference)

        # damage one record on the server's disk: it is not used, its chunk runs again, the record is rewritten
        top = Path(xrootd_server.local_dir, tmp_path.name, "cache", "cache")  # <cache URL>/cache/<namespace>
        (ns,) = [p for p in top.iterdir() if p.name.startswith("coffea-chunks-SkimmingTtbar-")]
        victim = sorted(p for p in ns.iterdir() if p.name != "_about")[0]
        raw = bytearray(victim.read_bytes())
        raw[-5] ^= 0xFF
        victim.write_bytes(bytes(raw))
        log.unlink()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = _run(fileset, MQExecutor(client=client, cache=cache, status=False), SkimmingTtbar(str(log)))
        assert len(_executions(log)) == 1
        assert_identical(again, reference)
        assert [str(w.message) for w in caught if "corrupt" in str(w.message)] != []
        assert victim.read_bytes() != bytes(raw)  # rewritten, and valid now

        assert Lake(cache).cache_get(ns.name, victim.name) is not None  # checksum verified


@pytest.mark.parametrize("where", ["unreachable", "refused"])
def test_failing_lake_still_runs_and_says_so_once(
    where, fileset, reference, client, start_worker, webdav_server: LakeServer, tmp_path
) -> None:
    from mqexec import MQExecutor

    start_worker("--concurrency", "2")
    # refused: the WebDAV server wants a password that neither the client nor the workers have
    cache = f"davs://127.0.0.1:{free_port()}/cache" if where == "unreachable" else f"{webdav_server.url}/cache"
    log = tmp_path / "executions.log"
    env_ca = {"SSL_CERT_FILE": webdav_server.cafile or ""}
    with warnings.catch_warnings(record=True) as caught, _env(env_ca):
        warnings.simplefilter("always")
        out = _run(fileset, MQExecutor(client=client, cache=cache, status=False), CountingTtbar(str(log)))
    assert_identical(out, reference)
    assert len(_executions(log)) == 12
    messages = [str(w.message) for w in caught if "MQExecutor" in str(w.message)]
    assert len(messages) == 2, messages  # one per Runner stage (preprocessing, chunks), not one per chunk
    kind = "server unreachable" if where == "unreachable" else "authentication/permission refused"
    assert all(cache in m and kind in m for m in messages), messages
    assert "12 of 12 records not stored" in messages[1]


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Any:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class SlowCountingTtbar(CountingTtbar):
    """Sleeps ``MQEXEC_TEST_DELAY`` seconds (the worker's environment) before each chunk."""

    def process(self, events: Any) -> Any:
        import time

        time.sleep(float(os.environ.get("MQEXEC_TEST_DELAY", "0")))
        return super().process(events)


_CLIENT_SCRIPT = """
import json, sys
sys.path[:0] = {paths!r}
import test_cache_coffea as t
from mqexec import Client, MQExecutor
args = json.loads(sys.argv[1])
with Client(args["broker"], **args["settings"]) as client:
    ex = MQExecutor(client=client, cache=args["cache"], save=args["save"], status=False)
    t._run(args["fileset"], ex, t.SlowCountingTtbar(args["log"]))
print("done")
"""


def test_resume_after_the_client_is_killed(
    fileset, reference, broker_url, settings, start_worker, xrootd_server: LakeServer, tmp_path
) -> None:
    """SIGKILL the client (and, like a lost session, its workers) half-way; the rerun runs only what is
    missing and gives the output of an uninterrupted run."""
    import json
    import signal
    import subprocess
    import time

    from kombu import Connection

    from mqexec.config import Config
    from mqexec.outputs import load_output
    from mqexec.topology import delete_topology

    script = tmp_path / "client.py"
    script.write_text(_CLIENT_SCRIPT.format(paths=[str(ROOT / "tests"), str(ROOT / "tools"), str(ROOT)]))
    log = tmp_path / "executions.log"
    cache = f"{xrootd_server.url}/{tmp_path.name}"
    args = {"broker": broker_url, "settings": settings, "cache": cache, "log": str(log), "fileset": fileset}

    def client(save: str | None) -> subprocess.Popen[str]:
        argv = [sys.executable, str(script), json.dumps(args | {"save": save})]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    worker = start_worker("--concurrency", "2", env={"MQEXEC_TEST_DELAY": "0.4"})
    first = client(None)
    deadline = time.monotonic() + 120
    while len(_executions(log)) < 4:  # about a third of the chunks are done
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the first run did not get going"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    worker.kill9()
    with Connection(broker_url.replace("amqp://", "pyamqp://", 1), connect_timeout=5) as conn:  # its queue, gone
        delete_topology(conn.channel(), Config.load(broker_url=broker_url, queue_prefix=settings["queue_prefix"]))
    (ns,) = [p for p in Path(xrootd_server.local_dir, tmp_path.name, "cache").iterdir() if "chunks" in p.name]
    stored = len([p for p in ns.iterdir() if p.name != "_about" and ".tmp-" not in p.name])
    done_before = len(_executions(log))
    assert 2 <= stored <= done_before < 12  # every chunk finished before the kill was kept

    start_worker("--concurrency", "2")
    saved = f"file://{tmp_path}/out/agc.coffea"
    second = client(saved)
    output, _ = second.communicate(timeout=240)
    assert second.returncode == 0, output
    assert len(_executions(log)) - done_before == 12 - stored  # only the missing chunks ran
    assert_identical(load_output(saved), reference)


def test_token_protected_webdav_cache_and_save(
    fileset, reference, client, start_worker, webdav_token_server: LakeServer, tmp_path, monkeypatch
) -> None:
    """Client and workers find the WLCG token and the CA directory in their environment; none travels."""
    from mqexec import MQExecutor
    from mqexec.outputs import load_output

    server = webdav_token_server
    (tmp_path / "token").write_text(server.token or "")
    grid = {"BEARER_TOKEN_FILE": str(tmp_path / "token"), "X509_CERT_DIR": server.ca_dir or ""}
    for name, value in grid.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("BEARER_TOKEN", raising=False)
    start_worker("--concurrency", "2", env=grid)
    cache, saved = f"{server.url}/{tmp_path.name}/cache", f"{server.url}/{tmp_path.name}/agc.coffea"
    log = tmp_path / "executions.log"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a cache problem would be a warning
        _run(fileset, MQExecutor(client=client, cache=cache, status=False), CountingTtbar(str(log)))
        again = _run(fileset, MQExecutor(client=client, cache=cache, save=saved, status=False), CountingTtbar(str(log)))
    assert len(_executions(log)) == 12  # the second run: all from the cache
    assert_identical(again, reference)
    assert_identical(load_output(saved), reference)
    records = _records(os.path.join(server.local_dir, tmp_path.name, "cache"))
    assert sorted(len(v) for v in records.values()) == [6, 12]


def test_two_clients_at_once_never_tear_a_record(
    fileset, reference, broker_url, settings, start_worker, xrootd_server: LakeServer, tmp_path
) -> None:
    import json
    import subprocess

    from mqexec.lake import Lake
    from mqexec.outputs import load_output

    script = tmp_path / "client.py"
    script.write_text(_CLIENT_SCRIPT.format(paths=[str(ROOT / "tests"), str(ROOT / "tools"), str(ROOT)]))
    cache = f"{xrootd_server.url}/{tmp_path.name}"
    log = tmp_path / "executions.log"
    start_worker("--concurrency", "2")
    start_worker("--concurrency", "2")
    procs, saved = [], []
    for i in range(2):
        saved.append(f"file://{tmp_path}/out{i}.coffea")
        args = {"broker": broker_url, "settings": settings, "cache": cache, "log": str(log), "fileset": fileset}
        argv = [sys.executable, str(script), json.dumps(args | {"save": saved[-1]})]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
    for url in saved:
        assert_identical(load_output(url), reference)
    assert 12 <= len(_executions(log)) <= 24  # each chunk ran once or twice, never more
    lake = Lake(cache)
    records = _records(os.path.join(xrootd_server.local_dir, tmp_path.name))
    (chunks,) = [ns for ns in records if ns.startswith("coffea-chunks-")]
    assert len(records[chunks]) == 12
    for key in records[chunks]:  # every record whole: its checksum matches
        assert lake.cache_get(chunks, key) is not None
    leftovers = list(Path(xrootd_server.local_dir, tmp_path.name).rglob("*.tmp-*"))
    assert leftovers == []


def test_a_colleague_s_cache_is_read_and_never_written(
    fileset, reference, client, start_worker, xrootd_server: LakeServer, tmp_path
) -> None:
    from mqexec import MQExecutor

    start_worker("--concurrency", "2")
    colleague = f"{xrootd_server.url}/{tmp_path.name}/colleague"
    mine = f"file://{tmp_path}/mine"
    log = tmp_path / "executions.log"
    _run(fileset, MQExecutor(client=client, cache=colleague, status=False), CountingTtbar(str(log)))
    theirs = Path(xrootd_server.local_dir, tmp_path.name, "colleague")
    before = sorted((p.relative_to(theirs), p.stat().st_mtime_ns) for p in theirs.rglob("*"))

    shared = [mine, colleague]  # read both, write mine
    out = _run(fileset, MQExecutor(client=client, cache=shared, status=False), CountingTtbar(str(log)))
    assert len(_executions(log)) == 12  # everything came from the colleague's cache
    assert_identical(out, reference)
    _run(fileset, MQExecutor(client=client, cache=shared, status=False), CountingTtbar(str(log), "mine"))
    assert len(_executions(log)) == 24  # my variant ran, and went to my cache
    assert sorted((p.relative_to(theirs), p.stat().st_mtime_ns) for p in theirs.rglob("*")) == before
    records = _records(str(tmp_path / "mine"))
    assert sorted(len(v) for v in records.values()) == [0, 0, 12]  # described; read from the colleague; mine
