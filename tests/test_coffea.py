"""MQExecutor under coffea's ``processor.Runner``: the AGC ttbar processor on synthetic NanoAOD, compared with
coffea's IterativeExecutor, on the embedded default and on RabbitMQ with real ``mqexec worker`` processes."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

coffea_processor = pytest.importorskip("coffea.processor")
from coffea.nanoevents import NanoAODSchema  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHUNKSIZE = 5_000

# the processors below travel to the workers by value (the workers cannot import this test module)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _load_agc():
    spec = importlib.util.spec_from_file_location("agc_ttbar", ROOT / "docs" / "examples" / "agc_ttbar.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["agc_ttbar"] = module
    spec.loader.exec_module(module)
    module._ship_processor_by_value()  # registers the example for pickling by value
    return module


agc = _load_agc()


class SlowTtbar(agc.TtbarAnalysis):
    """The AGC processor, slowed down so that a worker can be killed while chunks run."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def process(self, events):
        time.sleep(self.delay)
        return super().process(events)


class FailingTtbar(agc.TtbarAnalysis):
    """The AGC processor, raising in one chunk."""

    def __init__(self, filename: str, entrystart: int) -> None:
        super().__init__()
        self.bad = (filename, entrystart)

    def process(self, events):
        meta = events.metadata
        if (os.path.basename(meta["filename"]), meta["entrystart"]) == self.bad:
            raise ZeroDivisionError("this chunk is cursed")
        return super().process(events)


def _coffea_loaded() -> bool:
    return "coffea" in sys.modules


# -------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fileset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 processes x 2 files x 10,000 events: 12 chunks of 5,000."""
    return agc.build_fileset(tmp_path_factory.mktemp("agc"), n_files=2, events_per_file=10_000)


@pytest.fixture(scope="module")
def reference(fileset: dict) -> tuple[dict, dict]:
    out, metrics = _run(fileset, coffea_processor.IterativeExecutor(status=False))
    return out, metrics


def _run(fileset: dict, executor, processor=None, **runner_kw):
    runner = coffea_processor.Runner(
        executor=executor, schema=NanoAODSchema, chunksize=CHUNKSIZE, savemetrics=True, metadata_cache={}, **runner_kw
    )
    previous = NanoAODSchema.warn_missing_crossrefs
    try:
        return runner(fileset, processor_instance=processor or agc.TtbarAnalysis(), treename="Events")
    finally:
        NanoAODSchema.warn_missing_crossrefs = previous


def assert_same_histograms(out: dict, ref: dict, rtol: float = 1e-5) -> None:
    """The same events and the same AGC histograms (every process, variation and bin, flow included)."""
    assert out["nevents"] == ref["nevents"]
    assert set(out["hist_dict"]) == set(ref["hist_dict"])
    for region, h in out["hist_dict"].items():
        r = ref["hist_dict"][region]
        assert set(h.axes["process"]) == set(r.axes["process"])
        assert set(h.axes["variation"]) == set(r.axes["variation"])
        for p in r.axes["process"]:
            for v in r.axes["variation"]:
                a, b = h[:, p, v].view(flow=True), r[:, p, v].view(flow=True)
                np.testing.assert_allclose(a["value"], b["value"], rtol=rtol, err_msg=f"{region} {p} {v}")
                np.testing.assert_allclose(a["variance"], b["variance"], rtol=rtol, err_msg=f"{region} {p} {v}")


def assert_same(result: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    (out, metrics), (ref, ref_metrics) = result, reference
    assert_same_histograms(out, ref)
    yields, ref_yields = agc.region_yields(out, {}), agc.region_yields(ref, {})
    assert yields == ref_yields
    # metrics: every chunk's entries counted exactly once, the same columns read
    assert metrics["chunks"] == ref_metrics["chunks"]
    assert metrics["entries"] == ref_metrics["entries"] == sum(ref["nevents"].values())
    assert sorted(metrics["columns"]) == sorted(ref_metrics["columns"])
    assert metrics["bytesread"] > 0 and metrics["processtime"] > 0


def _region_counts(out: dict, fileset: dict) -> dict:
    return {region: {p: n for p, (n, _) in per.items()} for region, per in agc.region_yields(out, fileset).items()}


# ------------------------------------------------------------------------------------------------- tests
def test_lazy_import_empty_input_and_copy() -> None:
    code = "import sys, mqexec; assert 'coffea' not in sys.modules, 'import mqexec imported coffea'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    from coffea.processor import set_accumulator
    from coffea.processor.executor import ExecutorBase

    from mqexec import MQExecutor

    executor = MQExecutor(status=False)
    assert isinstance(executor, ExecutorBase)
    acc = set_accumulator()
    assert executor([], len, acc) == (acc, 0)  # the tuple, also for empty input (coffea returns acc alone)
    assert executor._session._owned is None  # nothing was started for it
    copy = executor.copy(function_name="get_metadata", desc="Preprocessing", compression=None)
    assert (copy.function_name, copy.compression, copy.retries) == ("get_metadata", None, 3)
    assert copy._session is executor._session  # Runner's per-stage copies share one client
    with pytest.raises(ValueError, match="merging"):
        MQExecutor(merging=1)


def test_embedded_default_matches_iterative(fileset, reference) -> None:
    from mqexec import MQExecutor

    with MQExecutor(status=False) as executor:
        assert_same(_run(fileset, executor), reference)


def test_two_rabbitmq_workers_match_iterative(fileset, reference, client, start_worker) -> None:
    from mqexec import MQExecutor

    workers = [start_worker("--concurrency", "1") for _ in range(2)]
    assert client.submit(_coffea_loaded, pure=False).result(60) is False  # a worker imports coffea lazily

    sent: list[tuple[str, int, bool]] = []
    build = client._courier._message

    def recording(batch):
        mid, body, headers, properties = build(batch)
        sent.append((headers["argsrepr"], len(body), "b" in json.loads(body)[0][0]["fn"]))
        return mid, body, headers, properties

    client._courier._message = recording
    assert_same(_run(fileset, MQExecutor(client=client, status=False)), reference)
    chunk_messages = [s for s in sent if s[0].endswith("]")]
    assert len(chunk_messages) == reference[1]["chunks"]
    # the processor (inside Runner's function) is shipped once per worker by hash, not in every message
    assert all(by_hash for _, _, by_hash in chunk_messages)
    assert max(size for _, size, _ in chunk_messages) < 3000, chunk_messages
    assert any(s[0].startswith("ttbar__nominal/ttbar__nominal_001.root [5000-10000]") for s in sent)
    # readable names reach the workers' logs
    logs = "".join(w.text() for w in workers)
    assert "wjets__nominal/wjets__nominal_000.root [0-5000]" in logs

    # merging on the workers first gives the same output
    assert_same(_run(fileset, MQExecutor(client=client, status=False, merging=3)), reference)
    assert any(s[0].startswith("merge of 3 outputs") for s in sent)
    # consumed chunk outputs are released: the client keeps no results after the runs (memory stays flat)
    import gc

    gc.collect()
    deadline = time.monotonic() + 10
    while client._ledger.states and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not client._ledger.states, sorted(client._ledger.states)[:5]


def test_worker_killed_mid_run_loses_and_doubles_nothing(fileset, reference, client, start_worker) -> None:
    from mqexec import MQExecutor

    workers = [start_worker("--concurrency", "1") for _ in range(2)]
    killed = threading.Event()

    def kill_mid_chunk() -> None:
        deadline = time.monotonic() + 90
        while not re.search(r"ran \S+ \[\d+-\d+\] in", workers[0].text()):  # a chunk done: the next runs
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(0.4)  # into its next chunk (each sleeps 1 s)
        workers[0].kill9()
        killed.set()

    killer = threading.Thread(target=kill_mid_chunk, daemon=True)
    killer.start()
    result = _run(fileset, MQExecutor(client=client, status=False), processor=SlowTtbar(1.0))
    killer.join(5)
    assert killed.is_set(), "the worker was not killed during the run"
    assert_same(result, reference)
    assert "ran " in workers[1].text()


def test_bad_files_skipped_or_named(fileset, reference, client, start_worker, tmp_path) -> None:
    from coffea.processor import Err

    from mqexec import MQExecutor

    start_worker("--concurrency", "2")
    good = next(iter(fileset["ttbar__nominal"]["files"]))
    truncated = tmp_path / "truncated.root"
    truncated.write_bytes(Path(good).read_bytes()[: Path(good).stat().st_size // 10])  # header intact
    missing = tmp_path / "missing.root"
    bad = {
        "files": {str(truncated): "Events", str(missing): "Events"},
        "metadata": dict(fileset["ttbar__nominal"]["metadata"]),
    }
    with_bad = {**fileset, "bad__nominal": bad}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = _run(with_bad, MQExecutor(client=client, status=False), skipbadfiles=True)
    skipped = [str(w.message) for w in caught if "MQExecutor skipped" in str(w.message)]
    assert any("bad__nominal/missing.root (get_metadata)" in m for m in skipped), skipped
    assert any("bad__nominal/truncated.root [0-5000]" in m for m in skipped), skipped
    assert out["nevents"] == reference[0]["nevents"]
    assert _region_counts(out, fileset) == _region_counts(reference[0], fileset)

    # without skipbadfiles the run stops with the original error, naming the file
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        _run(
            {"bad__nominal": {**bad, "files": {str(truncated): "Events"}}},
            MQExecutor(client=client, status=False, retries=1),
        )
    assert "bad__nominal/truncated.root [" in "\n".join(info.value.__notes__)
    assert time.monotonic() - started < 60  # generous: a hang would block until the test suite times out

    # use_result_type: the error comes back as Err, not raised
    result = coffea_processor.Runner(
        executor=MQExecutor(client=client, status=False),
        schema=NanoAODSchema,
        chunksize=CHUNKSIZE,
        skipbadfiles=True,
        use_result_type=True,
        metadata_cache={},
    )({"bad__nominal": bad}, processor_instance=agc.TtbarAnalysis(), treename="Events")
    assert isinstance(result, Err) and isinstance(result.exception, OSError)


def test_failing_chunk_is_named_and_recoverable(fileset, reference, client, start_worker) -> None:
    from mqexec import MQExecutor

    start_worker("--concurrency", "2")
    processor = FailingTtbar("single_top_t_chan__nominal_001.root", 5_000)  # the last chunk
    with pytest.raises(ZeroDivisionError, match="cursed") as info:
        _run(fileset, MQExecutor(client=client, status=False, retries=0), processor=processor)
    assert (
        "mqexec: while running single_top_t_chan__nominal/single_top_t_chan__nominal_001.root [5000-10000]"
    ) in info.value.__notes__

    with pytest.raises(ZeroDivisionError) as info:
        _run(fileset, MQExecutor(client=client, status=False, retries=0, recoverable=True), processor=processor)
    partial = info.value.partial_output  # Runner attaches what the recoverable executor returned
    assert sum(partial["nevents"].values()) < sum(reference[0]["nevents"].values())
    assert all(partial["nevents"][d] <= n for d, n in reference[0]["nevents"].items() if d in partial["nevents"])
