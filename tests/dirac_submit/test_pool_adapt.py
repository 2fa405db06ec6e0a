"""Contract tests: JobPool.scale/adapt against the Tornado contract server (DIRAC v9 and v8).

Most use a site of capacity 1; the parametric-limit tests a site where everything runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dirac_pki import PKI
from tornado_contract_server import TornadoContractServer

from dirac_submit import Adaptive, JobPool, JobTemplate, TornadoTransport

SLEEPER = JobTemplate(["sleep", "30"], name="sleeper")


@pytest.fixture
def small_site(pki: PKI, tmp_path: Path, dirac_version: str) -> Iterator[TornadoContractServer]:
    with TornadoContractServer(pki, workdir=tmp_path / "jobs", capacity=1, version=dirac_version) as server:
        yield server


def _transport(pki: PKI, server: TornadoContractServer) -> TornadoTransport:
    return TornadoTransport(server.url, proxy=str(pki.proxy), ca_dir=str(pki.ca_dir), setup=server.setup)


class FakeClock:
    """The pool's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pool(pki: PKI, small_site: TornadoContractServer, clock: FakeClock) -> Iterator[JobPool]:
    pool = JobPool(_transport(pki, small_site), SLEEPER, clock=clock)
    yield pool
    pool.close()


def settle(pool: JobPool, running: int) -> None:
    deadline = time.monotonic() + 10
    while sum(j.status == "Running" for j in pool.refresh()) != running or any(
        j.status in ("Received", "Submitting") for j in pool.jobs()
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_contract_adapt_caps_cools_down_counts_stuck_jobs_and_shrinks_pending_first(
    pool: JobPool, clock: FakeClock
) -> None:
    demand = [2]
    adaptive = Adaptive(pool, 0, 6, lambda: demand[0], interval=1, cooldown=60, stuck_after=300)

    first = adaptive.step()
    assert (first.target, first.submitted) == (2, 2)
    settle(pool, running=1)

    demand[0] = 4
    clock.now += 10  # within the cooldown
    assert adaptive.step().submitted == 0
    clock.now += 60
    assert adaptive.step().submitted == 2
    settle(pool, running=1)

    demand[0] = 50  # capped at 6, but 3 jobs have waited > stuck_after: no growth
    clock.now += 400
    blocked = adaptive.step()
    assert (blocked.target, blocked.active, blocked.pending, blocked.stuck, blocked.submitted) == (6, 4, 3, 3, 0)

    demand[0] = 1  # shrink: only jobs that never started are killed
    shrink = adaptive.step()
    assert shrink.killed == 3
    assert [j.status for j in pool.refresh() if not j.final] == ["Running"]


def test_contract_scale_up_and_down(pool: JobPool, small_site: TornadoContractServer) -> None:
    pool.scale(3)
    assert len(pool.active()) == 3
    settle(pool, running=1)
    pool.scale(1)
    assert [j.status for j in pool.refresh() if not j.final] == ["Running"]
    pool.scale(0)
    assert pool.active() == []
    assert {j.status for j in small_site.jobs.values()} == {"Killed"}


def test_contract_adapt_thread_follows_demand_and_close_stops_it(
    pool: JobPool, small_site: TornadoContractServer
) -> None:
    adaptive = pool.adapt(1, 2, demand=lambda: 5, interval=0.05, cooldown=0)
    deadline = time.monotonic() + 10
    while len(pool.active()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pool.close()
    assert not adaptive._thread.is_alive()
    assert len(small_site.jobs) == 2
    assert {j.status for j in small_site.jobs.values()} == {"Killed"}


def _submissions(server: TornadoContractServer) -> list[str]:
    return [method for _, method in server.calls if method in ("submitJob", "confirmBulkSubmission")]


def test_contract_scale_25_goes_out_in_batches_of_20_and_all_25_run(
    pki: PKI, contract_server: TornadoContractServer
) -> None:
    """DIRAC refuses more than MaxParametricJobs (20) jobs in one description: 25 go out as 20 + 5."""
    batches: list[list[int]] = []
    with JobPool(_transport(pki, contract_server), SLEEPER, on_submit=batches.append) as pool:
        pool.scale(25)
        assert [len(b) for b in batches] == [20, 5]
        assert _submissions(contract_server) == ["submitJob", "confirmBulkSubmission"] * 2
        deadline = time.monotonic() + 30
        while sum(j.status == "Running" for j in pool.refresh()) < 25:
            assert time.monotonic() < deadline, [j.status for j in pool.jobs()]
            time.sleep(0.1)
        assert len(pool.active()) == 25 and len(contract_server.jobs) == 25
    assert {j.status for j in contract_server.jobs.values()} == {"Killed"}


def test_contract_adapt_growing_by_more_than_the_limit_ends_with_all_jobs(
    pki: PKI, contract_server: TornadoContractServer
) -> None:
    with JobPool(_transport(pki, contract_server), SLEEPER) as pool:
        step = Adaptive(pool, 0, 30, lambda: 25, interval=1, cooldown=0, stuck_after=600).step()
        assert (step.target, step.submitted) == (25, 25)
        assert len(pool.active()) == 25 and len(contract_server.jobs) == 25
        assert [m for m in _submissions(contract_server) if m == "submitJob"] == ["submitJob"] * 2


def test_contract_a_lower_server_limit_is_learned_from_its_refusal(
    pki: PKI, contract_server: TornadoContractServer
) -> None:
    """An admin set MaxParametricJobs = 7: the first batch of 16 is refused (Errno 1501, which creates nothing),
    then 7 + 7 + 2 go out."""
    contract_server.max_parametric = 7
    batches: list[list[int]] = []
    with JobPool(_transport(pki, contract_server), SLEEPER, on_submit=batches.append) as pool:
        assert len(pool.submit(16)) == 16
        assert [len(b) for b in batches] == [7, 7, 2] and pool.max_parametric == 7
        assert _submissions(contract_server) == ["submitJob"] + ["submitJob", "confirmBulkSubmission"] * 2 + [
            "submitJob",
            "confirmBulkSubmission",
        ]
        assert len(contract_server.jobs) == 16
