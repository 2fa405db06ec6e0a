"""``mqexec``: the command line.

mqexec worker --broker amqps://user:pw@host:5671/vhost --concurrency 8 --idle-timeout 600 --max-walltime 47h
mqexec key worker                 # the token a worker trusts (export MQEXEC_SECRET=...)
mqexec status --broker URL        # queues, workers, clients (--json, --watch)
mqexec flower --broker URL        # Celery Flower on this prefix's events (web UI on 127.0.0.1:5555)
mqexec doctor --broker URL        # is everything in place for a run? one line per check
"""

from __future__ import annotations

import argparse
import sys

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


def _key(args: argparse.Namespace) -> int:
    from .config import Config
    from .keys import Identity, default_key_file, load_identity

    cfg = Config.load()
    path = cfg.key_file or str(default_key_file())
    if args.action == "new":
        from pathlib import Path

        if Path(path).exists() and not args.force:
            raise MQExecError(
                f"{path} exists: `mqexec key new --force` replaces it (workers given the old "
                "token stop trusting this client)"
            )
        Path(path).unlink(missing_ok=True)
    me = load_identity(path) if not cfg.identity else Identity.parse(cfg.identity)
    if args.action == "worker":
        print(me.trust.token())
    else:
        print(f"key {me.trust.key_id} in {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from .status import main

    return main(args)


def _flower(args: argparse.Namespace) -> int:
    from .flowerui import main

    return main(args)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import main

    return main(args)


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
    w.add_argument("--hostname", help="worker name (default: mqexec-<env>-<DIRAC job id or pid>@<host>)")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    w.set_defaults(run=_worker)

    k = sub.add_parser("key", help="the signing key: `mqexec key worker` prints what workers trust (MQEXEC_SECRET)")
    k.add_argument("action", choices=["worker", "show", "new"], nargs="?", default="show")
    k.add_argument("--force", action="store_true", help="with `new`: replace an existing key")
    k.set_defaults(run=_key)

    s = sub.add_parser("status", help="queues, workers and clients of this prefix")
    s.add_argument("--broker")
    s.add_argument("--json", action="store_true", help="one JSON document (per refresh); fields: docs/observability.md")
    s.add_argument("--watch", type=float, nargs="?", const=2.0, help="refresh every N seconds (default 2)")
    s.add_argument(
        "--management",
        help="RabbitMQ management API, e.g. http://host:15672 (default $MQEXEC_MANAGEMENT_URL): also lists the "
        "clients, and per-queue rates over the last minute",
    )
    s.add_argument("--sample", type=float, default=5.0, help="without --management: seconds between the two "
                   "samples of the workers' counts for tasks/s (0: no rates)")  # fmt: skip
    s.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for the workers' answers")
    s.set_defaults(run=_status)

    f = sub.add_parser("flower", help="Celery Flower for this prefix's workers (needs mqexec[flower])")
    f.add_argument("--broker")
    f.add_argument("--port", type=int, default=5555)
    f.add_argument("--address", default="127.0.0.1", help="bind address (default: loopback only)")
    f.add_argument("--basic-auth", help="user:password the web UI asks for (default $MQEXEC_FLOWER_AUTH)")
    f.set_defaults(run=_flower)

    d = sub.add_parser("doctor", help="check broker, permissions, workers, lake and key before a run")
    d.add_argument("--broker")
    d.add_argument("--result-size", type=int, help="bytes of the biggest result the run returns")
    d.add_argument("--chunk-time", help="how long a chunk runs, e.g. 20m")
    d.set_defaults(run=_doctor)

    from . import accounts, cache_cli, dirac, image

    for module in (accounts, dirac, image, cache_cli):
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except MQExecError as exc:
        print(f"mqexec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
