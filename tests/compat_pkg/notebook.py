"""The analyst's script: runs the helpers of the sibling package ``compat_pkg`` on a client, prints the results.

    python notebook.py distributed | embedded | amqp://...      (mqexec settings from MQEXEC_* variables)

prints one JSON line, ``{"sums": [...], "outputs": [...]}``. ``tests/test_compat_code_shipping.py`` copies it
next to a copy of ``compat_pkg/`` and starts it from another folder.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from compat_pkg.physics import Processor, selected_sum

EVENTS = [[10.0, 30.0, 50.0], [26.0], [5.0]]  #: jet pTs of three events


def run(client: Any) -> dict[str, Any]:
    sums = [f.result(timeout=60) for f in client.map(selected_sum, EVENTS)]
    outputs = [f.result(timeout=60) for f in client.map(Processor(scale=2.0).process, EVENTS)]
    return {"sums": sums, "outputs": outputs}


def main(backend: str) -> dict[str, Any]:
    if backend == "distributed":
        from distributed import Client, LocalCluster

        with (
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            return run(client)
    import mqexec

    with mqexec.Client(None if backend == "embedded" else backend) as client:
        return run(client)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
