"""``mqexec status``: what the broker and the workers of this queue prefix say — queues, workers, clients.

    broker (AMQP)  ──passive declare──▶ depth and consumers of each task queue, P.dead's depth
    workers        ──Celery ``stats`` (read-only, answered unsigned; control.py)──▶ name, pool, tasks done, uptime
                                         + the ``mqexec`` block (intake.py): env, resources, DIRAC site and job,
                                           tasks taken and held
    management API ──(only with --management URL)──▶ every P.* queue: also the clients' P.results.<session>
                                                      queues, and RabbitMQ's delivery rates over the last minute
    ──▶ one snapshot (a dict: the ``--json`` document, fields in docs/observability.md) ──▶ text or JSON

Tasks per second come from RabbitMQ's own rates (deliveries, averaged over the last 60 s) when the management
API is given; otherwise from the workers' counts of tasks taken, sampled twice (``--sample`` seconds apart, or,
with ``--watch``, across the refreshes of the last minute). AMQP cannot list queues: without the management
API, the queues shown are this client's environment's and those the connected workers consume, and the
running clients are not known (``null`` in JSON).

    $ mqexec status --broker amqp://guest:guest@127.0.0.1:5672//
    $ mqexec status --json --management http://127.0.0.1:15672   # clients and per-queue rates too
    $ mqexec status --watch 5                                     # refresh every 5 s (Ctrl-C stops)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from .broker import connect, redact, split_urls
from .config import Config
from .errors import BrokerError
from .topology import task_queue_name

_NONE = "-"  #: a value not known
_TASK_QUEUE = re.compile(r"(py\d+\.\d+)(?:\.([A-Za-z0-9_-]+))?")  #: P.<env>[.<resource>] (topology.py)
_WINDOW = 60.0  #: tasks/s is averaged over this many seconds when the samples reach back that far


def worker_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per worker from Celery's ``inspect().stats()`` replies (and their ``mqexec`` block).

    >>> worker_rows({"w1@wn042": {"uptime": 5, "total": {"mqexec.run": 3}, "pool": {"max-concurrency": 2},
    ...              "mqexec": {"env": "py3.11", "resources": {}, "site": "LCG.X.org", "dirac_job": "17",
    ...                         "held": 1, "taken": 4}}})[0]["site"]
    'LCG.X.org'
    """
    rows = []
    for name, reply in sorted(stats.items()):
        info = reply.get("mqexec") or {}
        rows.append(
            {
                "name": name,
                "host": name.rpartition("@")[2],
                "site": info.get("site") or None,
                "dirac_job": info.get("dirac_job"),
                "env": info.get("env"),
                "resources": info.get("resources") or {},
                "concurrency": (reply.get("pool") or {}).get("max-concurrency"),
                "running": info.get("held"),
                "taken": info.get("taken"),
                "done": sum((reply.get("total") or {}).values()),
                "uptime_s": reply.get("uptime"),
            }
        )
    return rows


def _kinds_of(cfg: Config, worker: dict[str, Any]) -> dict[str, tuple[str, str | None]]:
    """The task queues a worker consumes — its environment's, and one per resource it offers — with their
    (environment, resource)."""
    if not worker["env"]:
        return {}
    mine = cfg.replace(env=worker["env"])
    return {task_queue_name(mine, r): (worker["env"], r) for r in [None, *sorted(worker["resources"])]}


class Management:
    """RabbitMQ's management HTTP API for the broker's vhost (read only), with the broker URL's user unless
    the management URL names one."""

    def __init__(self, url: str, cfg: Config) -> None:
        broker = urlsplit(split_urls(cfg.broker_url or "")[0])
        parts = urlsplit(url)
        self.base = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}".rstrip("/")
        self.shown = redact(url)
        self.vhost = quote(unquote(broker.path[1:] or "/"), safe="")
        user = unquote(parts.username or broker.username or "guest")
        password = unquote(parts.password or broker.password or "guest")
        manager = urllib.request.HTTPPasswordMgrWithDefaultRealm()
        manager.add_password(None, self.base, user, password)
        self._open = urllib.request.build_opener(urllib.request.HTTPBasicAuthHandler(manager)).open
        self.timeout = cfg.connect_timeout

    def queues(self, prefix: str) -> list[dict[str, Any]]:
        """Every queue of the vhost whose name starts with ``prefix.``, with delivery rates over 60 s."""
        query = "msg_rates_age=60&msg_rates_incr=10&columns=name,messages,consumers,message_stats"
        try:
            with self._open(f"{self.base}/api/queues/{self.vhost}?{query}", timeout=self.timeout) as response:
                listed = json.load(response)
        except urllib.error.HTTPError as exc:
            raise BrokerError(f"the management API at {self.shown} answered {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BrokerError(f"cannot read the management API at {self.shown}: {reason}") from None
        return [q for q in listed if str(q.get("name", "")).startswith(f"{prefix}.")]


def _rate(queue: dict[str, Any]) -> float:
    details = (queue.get("message_stats") or {}).get("deliver_get_details") or {}
    return float(details.get("avg_rate", details.get("rate", 0.0)))


def snapshot(cfg: Config, *, timeout: float = 1.0, management: Management | None = None) -> dict[str, Any]:
    """One look at the prefix (see the module docstring); rates are added by :func:`add_rates`.

    >>> snapshot(Config.load(broker_url="amqp://guest:guest@127.0.0.1:5672//"))["queues"][0]["name"]
    ... # doctest: +SKIP
    'mqexec.py3.11'
    """
    from amqp.exceptions import NotFound

    from .app import make_app

    prefix = cfg.queue_prefix
    with connect(cfg) as conn:
        replies = make_app(cfg).control.inspect(timeout=timeout, connection=conn).stats() or {}
        workers = worker_rows(replies)
        listed = management.queues(prefix) if management is not None else None
        kinds: dict[str, tuple[str | None, str | None]] = {task_queue_name(cfg): (cfg.env, None)}
        for w in workers:
            kinds.update(_kinds_of(cfg, w))
        for q in listed or []:
            kinds.setdefault(q["name"], _kind(prefix, q["name"]))
        queues = []
        for name, (env, resource) in kinds.items():
            if env is None:
                continue  # not a task queue (results, blobs, events, P.dead)
            try:
                _, depth, consumers = conn.channel().queue_declare(name, passive=True)
            except NotFound:
                continue
            queues.append(
                {"name": name, "env": env, "resource": resource, "depth": depth, "consumers": consumers,
                 "tasks_per_s": None}
            )  # fmt: skip
        clients = None  # the management API names the clients' queues; AMQP counts their consumers now
        if listed is not None:
            clients = []
            for q in listed:
                if q["name"].startswith(f"{prefix}.results."):
                    try:
                        _, waiting, consumers = conn.channel().queue_declare(q["name"], passive=True)
                    except NotFound:
                        continue  # the client closed meanwhile
                    session = q["name"].rpartition(".")[2]
                    clients.append({"session": session, "queue": q["name"], "consumers": consumers, "waiting": waiting})
        try:
            dead: int | None = conn.channel().queue_declare(f"{prefix}.dead", passive=True)[1]
        except NotFound:
            dead = None  # no worker of this prefix has started on this broker yet
    if listed is not None:
        rates = {q["name"]: _rate(q) for q in listed}
        for q in queues:
            q["tasks_per_s"] = rates.get(q["name"], 0.0)
    return {
        "time": time.time(),
        "broker": redact(cfg.broker_url or ""),
        "prefix": prefix,
        "queues": queues,
        "dead_letters": dead,
        "workers": [{**w, "queues": list(_kinds_of(cfg, w)), "tasks_per_s": None} for w in workers],
        "clients": clients,
        "rates": {
            "source": "management" if listed is not None else None,
            "window_s": 60.0 if listed is not None else None,
        },
        "tasks_per_s": sum(q["tasks_per_s"] for q in queues) if listed is not None else None,
    }


def _kind(prefix: str, name: str) -> tuple[str | None, str | None]:
    """(environment, resource) of a task queue ``P.py3.11[.GPU]`` listed by the management API; (None, None) for
    the other queues of the prefix."""
    match = _TASK_QUEUE.fullmatch(name[len(prefix) + 1 :])
    return (match.group(1), match.group(2)) if match else (None, None)


def add_rates(now: dict[str, Any], earlier: Iterable[dict[str, Any]]) -> None:
    """Fill in tasks/s from the workers' ``taken`` counts, against the oldest of ``earlier`` within the last
    minute (leaves RabbitMQ's rates alone). A queue gets a rate when each of its consumers consumes only it."""
    if now["rates"]["source"] == "management":
        return
    base = next((s for s in earlier if now["time"] - s["time"] <= _WINDOW + 1), None)
    if base is None or now["time"] <= base["time"]:
        return
    span = now["time"] - base["time"]
    before = {w["name"]: w["taken"] for w in base["workers"]}
    per_queue: dict[str, float] = {}
    mixed: set[str] = set()
    total = 0.0
    for w in now["workers"]:
        if w["name"] not in before or w["taken"] is None or before[w["name"]] is None:
            continue
        w["tasks_per_s"] = max(w["taken"] - before[w["name"]], 0) / span
        total += w["tasks_per_s"]
        if len(w["queues"]) == 1:
            per_queue[w["queues"][0]] = per_queue.get(w["queues"][0], 0.0) + w["tasks_per_s"]
        else:
            mixed.update(w["queues"])
    for q in now["queues"]:
        q["tasks_per_s"] = None if q["name"] in mixed else per_queue.get(q["name"], 0.0)
    now["tasks_per_s"] = total
    now["rates"] = {"source": "workers", "window_s": round(span, 1)}


# ------------------------------------------------------------------------------------------------------ text
def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return _NONE
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _uptime(seconds: Any) -> str:
    if seconds is None:
        return _NONE
    s = int(seconds)
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            for r in [header, *rows]]  # fmt: skip


def render(snap: dict[str, Any]) -> str:
    """The snapshot as the text ``mqexec status`` prints."""
    rates = snap["rates"]
    how = "not sampled"
    if rates["source"] == "management":
        how = "RabbitMQ's delivery rates over the last minute"
    elif rates["source"] == "workers":
        how = f"workers' tasks taken over {rates['window_s']:g} s"
    lines = [f"prefix {snap['prefix']} on {snap['broker']} · tasks/s: {how}", ""]
    rows = [[q["name"], str(q["depth"]), str(q["consumers"]), _cell(q["tasks_per_s"])] for q in snap["queues"]]
    rows.append([f"{snap['prefix']}.dead (dead letters)", _cell(snap["dead_letters"]), "", ""])
    lines += _table(["queue", "waiting", "consumers", "tasks/s"], rows)
    lines.append("")
    if snap["workers"]:
        rows = [
            [
                w["name"],
                w["env"] or "?",
                ",".join(f"{k}={v:g}" for k, v in w["resources"].items()) or _NONE,
                w["site"] or _NONE,
                w["dirac_job"] or _NONE,
                f"{_cell(w['running'])}/{_cell(w['concurrency'])}",
                _cell(w["done"]),
                _uptime(w["uptime_s"]),
                _cell(w["tasks_per_s"]),
            ]
            for w in snap["workers"]
        ]
        lines += _table(["worker", "env", "resources", "site", "job", "running", "done", "up", "tasks/s"], rows)
    else:
        lines.append("no worker connected under this prefix")
    lines.append("")
    if snap["clients"] is None:
        lines.append("clients: not known without --management (AMQP cannot list queues)")
    elif snap["clients"]:
        rows = [[c["session"], str(c["consumers"]), str(c["waiting"])] for c in snap["clients"]]
        lines += _table(["client session", "consumers", "results waiting"], rows)
    else:
        lines.append("no client running")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``mqexec status [--json] [--watch [N]] [--management URL] [--sample S]``."""
    cfg = Config.load(broker_url=args.broker)
    if cfg.broker_url is None or not cfg.transport.quorum:
        raise BrokerError("mqexec status needs a RabbitMQ broker: pass --broker URL or set MQEXEC_BROKER_URL")
    url = args.management or os.environ.get("MQEXEC_MANAGEMENT_URL")
    management = Management(url, cfg) if url else None
    history: deque[dict[str, Any]] = deque()
    if args.watch is None and management is None and args.sample > 0:
        history.append(snapshot(cfg, timeout=args.timeout))
        time.sleep(args.sample)
    while True:
        snap = snapshot(cfg, timeout=args.timeout, management=management)
        add_rates(snap, history)
        if args.json:
            print(json.dumps(snap), flush=True)
        else:
            if args.watch is not None and sys.stdout.isatty():
                print("\033[H\033[2J", end="")
            print(render(snap), flush=True)
        if args.watch is None:
            return 0
        history.append(snap)
        while history and snap["time"] - history[0]["time"] > _WINDOW:
            history.popleft()
        time.sleep(args.watch)
