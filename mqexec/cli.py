"""``mqexec``: the command line.

mqexec worker --broker amqps://user:pw@host:5671/vhost --concurrency 8 --idle-timeout 600 --max-walltime 47h
mqexec status --broker URL        # queue depths and connected workers
mqexec flower --broker URL        # Celery Flower on this app's events (web UI on localhost:5555)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .errors import MQExecError


def _worker(args: argparse.Namespace) -> int:
    from .config import Config
    from .worker import run_worker

    cfg = Config.load(
        broker_url=args.broker,
        concurrency=args.concurrency,
        resources=args.resources,
        idle_timeout=args.idle_timeout,
        max_walltime=args.max_walltime,
        drain_margin=args.drain_margin,
        env=args.env,
    )
    return run_worker(cfg, hostname=args.hostname, loglevel=args.loglevel, exit_with_parent=args.exit_with_parent)


def _status(args: argparse.Namespace) -> int:
    from .app import make_app, queue_name, task_queue
    from .broker import connect
    from .config import Config

    cfg = Config.load(broker_url=args.broker)
    with connect(cfg) as conn:
        _, depth, consumers = task_queue(cfg)(conn.default_channel).queue_declare(passive=True)
    print(f"{queue_name(cfg)}: {depth} waiting, {consumers} consumers")
    replies = make_app(cfg).control.inspect(timeout=1.0).active_queues() or {}
    for worker, queues in sorted(replies.items()):
        print(f"  {worker}: {', '.join(q['name'] for q in queues)}")
    return 0


def _flower(args: argparse.Namespace) -> int:
    from .app import make_app
    from .config import Config

    app = make_app(Config.load(broker_url=args.broker))
    app.start(["flower", f"--port={args.port}", f"--address={args.address}"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mqexec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("worker", help="run a worker: connect out to the broker, run tasks")
    w.add_argument("--broker", help="broker URL (default: $MQEXEC_BROKER_URL)")
    w.add_argument("--concurrency", "-c", type=int, help="pool processes (default: CPU count)")
    w.add_argument("--resources", help="resources this worker offers, e.g. GPU=1 (consumes their queues)")
    w.add_argument("--idle-timeout", help="exit cleanly after this long without tasks, e.g. 600 or 10m")
    w.add_argument("--max-walltime", help="the batch job's walltime, e.g. 47h: drain before reaching it")
    w.add_argument("--drain-margin", help="stop taking tasks this long before --max-walltime")
    w.add_argument("--env", help="serve another environment's queue (default: this Python, e.g. py3.11)")
    w.add_argument("--hostname", help="worker name (default: mqexec-<env>-<pid>@<host>)")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    w.set_defaults(run=_worker)

    s = sub.add_parser("status", help="queue depth and connected workers")
    s.add_argument("--broker")
    s.set_defaults(run=_status)

    f = sub.add_parser("flower", help="Celery Flower for mqexec workers (needs mqexec[flower])")
    f.add_argument("--broker")
    f.add_argument("--port", type=int, default=5555)
    f.add_argument("--address", default="127.0.0.1")
    f.set_defaults(run=_flower)

    _register_optional(sub)
    return parser


def _register_optional(sub: Any) -> None:
    """Sub-commands of optional parts (``mqexec submit dirac``, ``mqexec jobs``), when present."""
    try:
        from .dirac import register_cli
    except ImportError:
        return
    register_cli(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except MQExecError as exc:
        print(f"mqexec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
