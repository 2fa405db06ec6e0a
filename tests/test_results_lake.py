"""Big results go to the data lake (a real XRootD server), small ones through the broker."""

from __future__ import annotations

import numpy as np
from lake_servers import xrootd_server  # noqa: F401 - the fixture

import mqexec


def big_array(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def test_big_results_travel_through_the_lake(start_worker, broker_url, settings, xrootd_server):  # noqa: F811
    lake = xrootd_server.url + "/results"
    start_worker("--concurrency", "2")
    with mqexec.Client(broker_url, lake_url=lake, **settings) as client:
        big = client.submit(big_array, 1_000_000)  # 8 MB: over the 1 MiB inline limit
        small = client.submit(big_array, 10)
        total = client.submit(np.sum, big)  # a lake result as another task's argument: read there, not here
        assert total.result(timeout=60) == sum(range(1_000_000))
        values = client._ledger.values
        assert values[big.key].lake is not None and values[small.key].lake is None
        ref = values[big.key].lake
        assert ref["url"].startswith("root://") and ref["size"] > 8_000_000
        np.testing.assert_array_equal(big.result(timeout=60), np.arange(1_000_000, dtype=np.float64))
        np.testing.assert_array_equal(small.result(timeout=60), np.arange(10, dtype=np.float64))
