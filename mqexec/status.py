"""``mqexec status``: what the broker knows about this queue prefix — queues, workers, clients."""

from __future__ import annotations

import argparse
import json

from .config import Config


def main(args: argparse.Namespace) -> int:
    from .app import make_app
    from .broker import connect
    from .topology import task_queue, task_queue_name

    cfg = Config.load(broker_url=args.broker)
    with connect(cfg) as conn:
        _, depth, consumers = task_queue(cfg)(conn.default_channel).queue_declare(passive=True)
    workers = make_app(cfg).control.inspect(timeout=1.0).active_queues() or {}
    if args.json:
        print(
            json.dumps(
                {
                    "queues": [{"name": task_queue_name(cfg), "depth": depth, "consumers": consumers}],
                    "workers": sorted(workers),
                }
            )
        )
        return 0
    print(f"{task_queue_name(cfg)}: {depth} waiting, {consumers} consumers")
    for worker, queues in sorted(workers.items()):
        print(f"  {worker}: {', '.join(q['name'] for q in queues)}")
    return 0
