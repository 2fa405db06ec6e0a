"""The churn soak of issue 9: coffea runs of 600 chunks, back to back, while workers are SIGKILLed at random and
replaced; every run's histogram must be the serial one, every chunk counted once.

    python -m pytest tests/test_soak.py                  # 1 minute, a light processor (in the default suite)
    python -m pytest tests/test_soak.py -m slow          # 10 minutes, the AGC ttbar processor
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np
import pytest
from reliability_log import record
from workerproc import Worker

import mqexec

coffea_processor = pytest.importorskip("coffea.processor")
from coffea.nanoevents import BaseSchema, NanoAODSchema  # noqa: E402
from coffea.processor import ProcessorABC  # noqa: E402
from test_coffea import agc  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module

CHUNKSIZE = 100  # 3 datasets x 2 files x 10,000 events: 600 chunks


class JetPt(ProcessorABC):  # type: ignore[misc]
    """A light processor (~40 ms a chunk): weighted jet pt per dataset, and events per dataset."""

    def process(self, events: Any) -> dict[str, Any]:
        import awkward as ak
        import hist

        dataset = events.metadata["dataset"]
        h = hist.Hist.new.StrCat([], name="dataset", growth=True).Reg(60, 0, 300, name="pt").Weight()
        jets = events.Jet_pt
        h.fill(dataset=dataset, pt=ak.flatten(jets), weight=ak.flatten(ak.ones_like(jets) * 0.25))
        return {"pt": h, "nevents": {dataset: len(events)}}

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


@pytest.fixture(scope="module")
def soak_fileset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return dict(agc.build_fileset(tmp_path_factory.mktemp("soak"), n_files=2, events_per_file=10_000))


def _run(fileset: dict[str, Any], executor: Any, processor: Any, schema: Any, chunksize: int) -> tuple[Any, Any]:
    runner = coffea_processor.Runner(
        executor=executor, schema=schema, chunksize=chunksize, savemetrics=True, metadata_cache={}
    )
    previous = NanoAODSchema.warn_missing_crossrefs
    try:
        return runner(fileset, processor_instance=processor, treename="Events")
    finally:
        NanoAODSchema.warn_missing_crossrefs = previous


def _same(out: dict[str, Any], ref: dict[str, Any]) -> None:
    """The same output: histograms bin by bin (values and variances), events per dataset."""
    assert out["nevents"] == ref["nevents"]
    hists = {k: v for k, v in ref.items() if k != "nevents"}
    for name, h in hists.items():
        if isinstance(h, dict):  # AGC: {"hist_dict": {region: Hist}, ...}
            for region in h:
                _same_hist(out[name][region], h[region])
        else:
            _same_hist(out[name], h)


def _same_hist(a: Any, b: Any) -> None:
    assert [list(ax) for ax in a.axes if ax.traits.discrete] == [list(ax) for ax in b.axes if ax.traits.discrete]
    va, vb = a.view(flow=True), b.view(flow=True)
    assert np.allclose(va["value"], vb["value"]) and np.allclose(va["variance"], vb["variance"])


class _Churn:
    """Workers killed with SIGKILL at random moments (every 3-9 s) and replaced at once."""

    def __init__(self, start: Callable[[], Worker], n: int, seed: int) -> None:
        self.workers = [start() for _ in range(n)]
        self.start = start
        self.kills = 0
        self.random = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.random.uniform(3.0, 9.0)):
            i = self.random.randrange(len(self.workers))
            self.workers[i].kill9()
            self.kills += 1
            self.workers[i] = self.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _soak(
    seconds: float,
    fileset: dict[str, Any],
    processor: Any,
    schema: Any,
    client: mqexec.Client,
    start_worker: Callable[..., Worker],
    case: str,
    reference_chunksize: int,
) -> None:
    """Soak for about ``seconds``; the serial reference is run with ``reference_chunksize`` (the runs' own chunk size
    for a processor whose output depends on where chunks begin: the AGC one seeds its smearing by chunk)."""
    from mqexec import MQExecutor

    serial = coffea_processor.IterativeExecutor(status=False)
    reference, ref_metrics = _run(fileset, serial, processor, schema, reference_chunksize)
    chunks = sum(-(-n // CHUNKSIZE) for n in reference["nevents"].values())
    assert chunks >= 500
    churn = _Churn(lambda: start_worker("--concurrency", "1", ready=False), 3, seed=int(time.time()))
    runs: list[float] = []
    try:
        started = time.monotonic()
        while not runs or time.monotonic() - started + sum(runs) / len(runs) / 2 <= seconds:  # about ``seconds``
            t = time.monotonic()
            out, metrics = _run(fileset, MQExecutor(client=client, status=False), processor, schema, CHUNKSIZE)
            _same(out, reference)  # every chunk counted once: the serial histogram, bin by bin
            assert metrics["chunks"] == chunks and metrics["entries"] == ref_metrics["entries"]
            runs.append(time.monotonic() - t)
    finally:
        churn.stop()
    stats = client.stats()["counts"]
    print(f"\nsoak: {len(runs)} runs of {chunks} chunks in {sum(runs):.0f} s, {churn.kills} workers killed; {stats}")
    assert churn.kills >= max(3, seconds // 20), "the churn did not churn"
    record(
        case,
        f"workers SIGKILLed at random (every 3-9 s, {churn.kills} in all) under {len(runs)} coffea runs of {chunks} "
        "chunks",
        "every run's histogram identical to the serial one",
        recover_s=None,
        lost=0,
        twice=stats.get("duplicates", 0),
        runs=len(runs),
        kills=churn.kills,
        resent=stats.get("resent", 0),
    )


@pytest.mark.timeout(300)
def test_churn_soak_one_minute(
    soak_fileset: dict[str, Any], client: mqexec.Client, start_worker: Callable[..., Worker]
) -> None:
    _soak(60, soak_fileset, JetPt(), BaseSchema, client, start_worker, "soak-1min", reference_chunksize=5_000)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_churn_soak_ten_minutes(
    soak_fileset: dict[str, Any], client: mqexec.Client, start_worker: Callable[..., Worker]
) -> None:
    processor = agc.TtbarAnalysis()
    _soak(
        600, soak_fileset, processor, NanoAODSchema, client, start_worker, "soak-10min", reference_chunksize=CHUNKSIZE
    )
