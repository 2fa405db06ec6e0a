"""Contract tests: JobPool.scale/adapt against the Tornado contract server with a site of capacity 1."""

from __future__ import annotations

import time

import pytest
from dirac_pki import PKI
from tornado_contract_server import TornadoContractServer

from dirac_submit import Adaptive, JobPool, JobTemplate, TornadoTransport

SLEEPER = JobTemplate(["sleep", "30"], name="sleeper")


@pytest.fixture
def small_site(pki: PKI, tmp_path) -> TornadoContractServer:
    with TornadoContractServer(pki, workdir=tmp_path / "jobs", capacity=1) as server:
        yield server


@pytest.fixture
def pool(pki: PKI, small_site: TornadoContractServer):
    now = [1000.0]
    pool = JobPool(
        TornadoTransport(small_site.url, proxy=str(pki.proxy), ca_dir=str(pki.ca_dir)),
        SLEEPER,
        clock=lambda: now[0],
    )
    pool.now = now  # the fake clock, for the test to move
    yield pool
    pool.close()


def settle(pool: JobPool, running: int) -> None:
    deadline = time.monotonic() + 10
    while sum(j.status == "Running" for j in pool.refresh()) != running or any(
        j.status in ("Received", "Submitting") for j in pool.jobs()
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_contract_adapt_caps_cools_down_counts_stuck_jobs_and_shrinks_pending_first(pool: JobPool) -> None:
    demand = [2]
    adaptive = Adaptive(pool, 0, 6, lambda: demand[0], interval=1, cooldown=60, stuck_after=300)

    first = adaptive.step()
    assert (first.target, first.submitted) == (2, 2)
    settle(pool, running=1)

    demand[0] = 4
    pool.now[0] += 10  # within the cooldown
    assert adaptive.step().submitted == 0
    pool.now[0] += 60
    assert adaptive.step().submitted == 2
    settle(pool, running=1)

    demand[0] = 50  # capped at 6, but 3 jobs have waited > stuck_after: no growth
    pool.now[0] += 400
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
