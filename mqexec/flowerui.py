"""``mqexec flower``: Celery Flower on this prefix's workers and tasks — a web page on loopback by default.

    workers ──Celery events on P.ev (task-received/started/succeeded/failed, heartbeats)──▶ Flower ──▶ browser
    Flower ──inspect (stats, active, ...) / signed control on P.pidbox──▶ workers     (nothing connects to a worker)

What the pages show comes from the task messages (``courier.py``): a task's *name* is the function's name (the
Celery ``shadow`` header, e.g. ``TtbarAnalysis``) and its *args* the call's readable label (``argsrepr``, e.g.
``ttbar__nominal/file_3.root [200000-300000]``) — never the signed, pickled payload. A worker's page shows, under
"Other", the ``mqexec`` block of its ``stats``: environment, resources, DIRAC site and job, tasks taken and held.

Flower's buttons (shut down, restart pool) send commands signed with this machine's identity, so workers obey
them: Flower therefore binds to 127.0.0.1 unless told otherwise, and refuses another address without
``--basic-auth`` (or ``$MQEXEC_FLOWER_AUTH``). For a remote look, prefer an SSH tunnel to the loopback port.

    mqexec flower --broker amqps://ana:***@broker.example:5671/cms            # http://127.0.0.1:5555
    MQEXEC_FLOWER_AUTH=ana:s3cret mqexec flower --address 0.0.0.0 --port 8080
"""

from __future__ import annotations

import argparse
import ipaddress
import os

from .config import Config
from .errors import ConfigError

AUTH_ENV = "MQEXEC_FLOWER_AUTH"
#: the tasks table: the function's name and the call's label first; no UUID or kwargs (always {}), no result (the
#: value goes to the client, not to Flower), the exception of a failed task
TASK_COLUMNS = "name,args,state,received,runtime,worker,exception"


def flower_argv(address: str, port: int, basic_auth: str | None) -> list[str]:
    """Flower's command line for these options; refuses a non-loopback address without basic auth.

    >>> flower_argv("127.0.0.1", 5555, None)
    ... # doctest: +NORMALIZE_WHITESPACE
    ['flower', '--address=127.0.0.1', '--port=5555', '--inspect_timeout=3000', '--purge_offline_workers=600',
     '--tasks_columns=name,args,state,received,runtime,worker,exception']
    >>> flower_argv("0.0.0.0", 5555, None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mqexec.errors.ConfigError: refusing to serve Flower on 0.0.0.0 without --basic-auth user:password: ...
    """
    if basic_auth is not None and (":" not in basic_auth or basic_auth.startswith(":")):
        raise ConfigError("--basic-auth must be user:password")
    if not _loopback(address) and not basic_auth:
        raise ConfigError(
            f"refusing to serve Flower on {address} without --basic-auth user:password: anyone who reaches it "
            "could stop your workers (or bind 127.0.0.1 and use an SSH tunnel)"
        )
    argv = ["flower", f"--address={address}", f"--port={port}"]
    argv += ["--inspect_timeout=3000", "--purge_offline_workers=600"]  # grid round trips; jobs come and go
    argv.append(f"--tasks_columns={TASK_COLUMNS}")
    if basic_auth:
        argv.append(f"--basic-auth={basic_auth}")
    return argv


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    """``mqexec flower [--broker URL] [--address A] [--port P] [--basic-auth user:password]``."""
    from .app import make_app

    cfg = Config.load(broker_url=args.broker)
    if cfg.broker_url is None or not cfg.transport.quorum:
        raise ConfigError("mqexec flower needs a RabbitMQ broker: pass --broker URL or set MQEXEC_BROKER_URL")
    argv = flower_argv(args.address, args.port, args.basic_auth or os.environ.get(AUTH_ENV) or None)
    make_app(cfg, owner=cfg.signer()).start(argv)
    return 0
