"""The command line: ``mqexec submit dirac``, ``mqexec jobs [kill|clean]`` and the in-job ``mqexec dirac-boot``.

::

    mqexec submit dirac --jobs 20 --url https://dirac.example.org:8443 --broker amqps://… --bootstrap amqps://…
    mqexec jobs                 # JOB ID  SITE  STATUS  MINOR STATUS  SINCE  RUN
    mqexec jobs kill --all      # or: mqexec jobs kill 1234 1235 — also stops their workers at once
    mqexec jobs clean           # forget runs whose jobs have all ended

Every error reaches the user as one line (``mqexec: error: …``) and a non-zero exit: DIRAC's (``DiracError``) are
turned into mqexec's here, so ``mqexec.cli.main`` prints them as it prints its own.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import ConfigError, MQExecError
from .keys import boot, dirac_job_id, rabbitmq_bootstrap, worker_hostname
from .state import config_of, runs, state_path, update_state
from .workers import TRANSPORTS, DiracSettings, DiracWorkers, halt_workers

if TYPE_CHECKING:
    from dirac_submit import JobInfo, SecretIssuer


def register_cli(subparsers: Any) -> None:
    """Add ``submit dirac``, ``jobs`` and the in-job ``dirac-boot`` to mqexec's command line."""
    submit = subparsers.add_parser("submit", help="start workers on a batch system")
    where = submit.add_subparsers(dest="system", required=True)
    d = where.add_parser(
        "dirac",
        help="mqexec workers as DIRAC jobs (stays in the foreground: it hands the jobs "
        "their sealed credentials; Ctrl-C kills them)",
    )
    d.add_argument("--jobs", type=int, required=True)
    d.add_argument("--url", default=os.environ.get("DIRAC_URL"), help="DIRAC server (default $DIRAC_URL)")
    d.add_argument("--transport", choices=TRANSPORTS, default="tornado")
    d.add_argument("--proxy", help="X.509 proxy (default $X509_USER_PROXY)")
    d.add_argument("--ca-dir", help="grid CA directory (default $X509_CERT_DIR)")
    d.add_argument("--dirac-setup", help="DIRAC v8 only: the setup jobs are filed under (/DIRAC/Setup)")
    d.add_argument("--site", default="", help="comma-separated DIRAC site names")
    d.add_argument("--tags", default="", help="comma-separated JDL Tags, e.g. GPU")
    d.add_argument("--cores", type=int, default=1)
    d.add_argument("--image", help="Apptainer image, e.g. docker://registry/mqexec-worker:py3.11")
    d.add_argument("--broker", help="broker URL (default $MQEXEC_BROKER_URL); reaches the jobs sealed only")
    d.add_argument("--walltime", default="24h")
    d.add_argument("--idle-timeout", default="10m")
    d.add_argument("--bootstrap", help="URL of a standing bootstrap account (see docs/dirac.md)")
    d.add_argument("--management-url", help="RabbitMQ management API: make a bootstrap user per run")
    d.add_argument(
        "--management-user",
        default="admin",
        help="its admin user; password from $MQEXEC_RABBITMQ_ADMIN_PASSWORD or a prompt",
    )
    d.add_argument("--queue-prefix")
    d.add_argument("--worker-command", default="mqexec", help="how jobs start mqexec, e.g. 'python3 -m mqexec'")
    d.add_argument("--poll", type=float, default=30.0, help="seconds between status polls")
    d.set_defaults(run=_sentences(_cli_submit))

    jobs = subparsers.add_parser("jobs", help="the DIRAC jobs of your runs: id, site, status, minor status, since")
    jobs.add_argument("--state", help=argparse.SUPPRESS)
    action = jobs.add_subparsers(dest="action")
    kill = action.add_parser("kill", help="kill jobs (--all, or ids) and stop their workers at once")
    kill.add_argument("ids", nargs="*", type=int)
    kill.add_argument("--all", action="store_true")
    action.add_parser("clean", help="forget runs whose jobs are all final")
    jobs.set_defaults(run=_sentences(_cli_jobs))

    b = subparsers.add_parser("dirac-boot", help="(inside a DIRAC job) fetch sealed credentials, exec mqexec worker")
    b.add_argument("--timeout", type=float, default=900.0)
    b.add_argument("argv", nargs=argparse.REMAINDER, help="the mqexec command to exec, e.g. worker -c 8")
    b.set_defaults(run=_sentences(_cli_boot))


def _sentences(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """DIRAC's errors as mqexec's (``mqexec.cli.main`` prints those as one line, exit 2), on one line each."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            from dirac_submit import DiracError
        except ImportError as exc:
            raise ConfigError(f"mqexec's DIRAC commands need pip install 'mqexec[dirac]' ({exc})") from None
        try:
            return run(args)
        except (DiracError, MQExecError) as exc:
            raise MQExecError(" ".join(str(exc).split())) from None

    return wrapped


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _cli_submit(args: argparse.Namespace) -> int:
    import shlex
    import signal

    from ..worker import setup_logging
    from .progress import FirstWorkers

    setup_logging("INFO")
    if not args.url:
        raise ConfigError("no DIRAC server: pass --url https://host:8443 or set DIRAC_URL")
    cfg = Config.load(broker_url=args.broker, queue_prefix=args.queue_prefix)
    bootstrap = args.bootstrap or _management_bootstrap(args)
    if bootstrap is None:
        raise ConfigError(
            "no bootstrap account for the jobs to fetch their credentials with: pass --bootstrap "
            "amqps://boot:pw@host/vhost (a standing account, see docs/dirac.md) or --management-url (a user per run)"
        )
    settings = DiracSettings(
        args.url,
        bootstrap=bootstrap,
        broker=cfg.broker_url,
        transport=args.transport,
        proxy=args.proxy,
        ca_dir=args.ca_dir,
        dirac_setup=args.dirac_setup,
        sites=_split(args.site),
        tags=_split(args.tags),
        cores=args.cores,
        image=args.image,
        walltime=args.walltime,
        idle_timeout=args.idle_timeout,
        config=cfg,
        command=shlex.split(args.worker_command),
    )
    watch = FirstWorkers(cfg)
    workers = DiracWorkers(settings, on_credentials=watch.credentials)

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    try:
        watch.start()
        workers.scale(args.jobs)
        ids = [j.job_id for j in workers.pool.jobs()]
        watch.jobs(ids)
        print(
            f"run {workers.run}: submitted {len(ids)} job(s) {' '.join(map(str, ids))} to {args.url}; "
            "handing out their credentials until they end (Ctrl-C kills them; `mqexec jobs` shows them)",
            flush=True,
        )
        final = workers.wait(poll=args.poll, on_poll=watch.polled)
        print(f"run {workers.run}: every job has ended", flush=True)
        if (summary := watch.summary()) is not None:
            print(f"run {workers.run}: {summary}", flush=True)
        if not watch.booted:
            raise MQExecError(_why_no_worker_started(workers.run, final, workers.keys.refusals))
    except KeyboardInterrupt:
        print(f"run {workers.run}: killing the jobs", flush=True)
    finally:
        watch.stop()
        workers.close()
    return 0


def _management_bootstrap(args: argparse.Namespace) -> Callable[..., SecretIssuer] | None:
    import getpass

    if not args.management_url:
        return None
    password = os.environ.get("MQEXEC_RABBITMQ_ADMIN_PASSWORD") or getpass.getpass(
        f"RabbitMQ management password for {args.management_user}: "
    )
    return rabbitmq_bootstrap(args.management_url, (args.management_user, password))


def _why_no_worker_started(run: str, jobs: list[JobInfo], refusals: list[str]) -> str:
    ended = "; ".join(f"job {j.job_id} {j.status} ({j.minor_status})" for j in jobs)
    why = f"run {run}: none of its {len(jobs)} job(s) got its credentials, so no worker started: {ended}"
    if refusals:
        why += f"; the key service refused: {refusals[-1]}"
    return why + " (the jobs' std.err, in their output sandbox, says more)"


def _fmt(when: Any) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if isinstance(when, datetime) else "-"


def _cli_jobs(args: argparse.Namespace) -> int:
    from dirac_submit import FINAL_STATUSES

    path = Path(args.state) if args.state else state_path()
    if args.action == "clean":
        done = []
        for run, rec, transport in runs(path):
            states = transport.status(rec["jobs"])
            if all(s.status in FINAL_STATUSES for s in states.values()):
                done.append(run)

        def forget(state: dict[str, Any]) -> None:
            for run in done:
                state["runs"].pop(run, None)

        update_state(path, forget)
        print(f"forgot {len(done)} finished run(s)")
        return 0
    if args.action == "kill":
        return _kill(path, args.ids, everything=args.all)
    rows = [("JOB ID", "SITE", "STATUS", "MINOR STATUS", "SINCE", "RUN")]
    for run, rec, transport in runs(path):
        states = transport.status(rec["jobs"])
        for job_id in rec["jobs"]:
            s = states.get(job_id)
            rows.append(
                (
                    str(job_id),
                    s.site if s else "?",
                    s.status if s else "unknown to DIRAC",
                    s.minor_status if s else "",
                    _fmt(s.since if s else None),
                    run,
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _kill(path: Path, ids: list[int], *, everything: bool) -> int:
    """Kill the jobs in DIRAC, then tell exactly their workers (through the broker, as the owner) to stop."""
    from dirac_submit import FINAL_STATUSES

    if not everything and not ids:
        raise ConfigError("say which jobs: mqexec jobs kill --all, or mqexec jobs kill ID [ID ...]")
    killed, stopped = 0, []
    for _run, rec, transport in runs(path):
        mine = [i for i in rec["jobs"] if everything or i in ids]
        states = transport.status(mine) if mine else {}
        live = [i for i, s in states.items() if s.status not in FINAL_STATUSES]
        done = transport.kill(live).done if live else []
        killed += len(done)
        halt = sorted(set(done) | (set(mine) if not everything else set()))  # named ids: also if already final
        cfg = config_of(rec)
        if halt and cfg is not None:
            stopped += halt_workers(cfg, halt)
    print(f"killed {killed} job(s)" + (f"; {len(stopped)} of their workers stopped taking tasks" if stopped else ""))
    return 0


def _cli_boot(args: argparse.Namespace) -> int:
    import socket

    argv = [a for a in args.argv if a != "--"]
    if not argv:
        raise ConfigError("dirac-boot needs the command to run, e.g. dirac-boot worker --concurrency 8")
    env = boot(timeout=args.timeout)
    if argv[0] == "worker" and "--hostname" not in argv:  # several jobs on one node need distinct names
        argv += ["--hostname", worker_hostname(dirac_job_id(env) or str(os.getpid()), socket.gethostname())]
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "mqexec", *argv], env)
    return 0  # not reached
