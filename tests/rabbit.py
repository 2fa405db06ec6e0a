"""Private RabbitMQ nodes for fault tests: start, break, restart and remove real brokers — never the shared one.

One pytest process owns one run directory; every node of the run lives in it and goes with it:

    <tmp>/mqexec-rabbit-<pytest pid>-XXXX/
        home/.erlang.cookie     this run's own cookie: its rabbitmqctl reaches this run's nodes and nothing else
        mqt<pid>n<k>/           one node: rabbitmq.conf, advanced.config, enabled_plugins, rabbitmq-env.conf,
                                home/ (the VM's $HOME), mnesia/ (data), log/, stdout.log, pid

    PrivateNode(settings) ──start()──▶ running ──stop() | kill9()──▶ down ──start()──▶ running (same data, ports)
        files written          AMQP login works                 data dir kept
    remove(): SIGKILL + delete — by the fixtures' finalizers; an atexit hook removes whatever of the run is
    left (also after Ctrl-C); the next run's first node sweeps what a SIGKILLed pytest left behind.

Every ``rabbitmqctl`` call names the node (``-n``) and runs with the run's cookie; every node gets its own
``RABBITMQ_*`` paths and ports and ignores /etc/rabbitmq (own config and env files). Debian's 3.10.8 boots a fresh
node to its first AMQP login in ~4-5 s here, a restart in ~3.5-4 s (``PrivateNode.startup_seconds``).

A test module gets a fixture by importing it: ``from rabbit import fixture_rabbit_node  # noqa: F401`` provides
``rabbit_node``; likewise ``fixture_rabbit_tls`` and ``fixture_rabbit_cluster``:

    def test_long_task(rabbit_node):                    # function scope: the test may stop, kill, restart it
        node = rabbit_node(consumer_timeout(20_000) + max_message_size())
        client = mqexec.Client(node.url(), ...); node.close_all_connections(); node.kill9(); node.start()

    def test_amqps(rabbit_tls):                         # one TLS node pair per session (restarted if killed)
        url = rabbit_tls.node.url(tls=True)             # amqps://guest:guest@127.0.0.1:<port>//
        Connection(url, ssl=rabbit_tls.pki.client_ssl()).connect()   # rabbit_tls.wrong_host: a bad certificate

    def test_failover(rabbit_cluster):                  # one 3-node cluster per session, healed before each test
        url = rabbit_cluster.failover_url()             # amqp://...:p1//;amqp://...:p2//;amqp://...:p3//
        rabbit_cluster.leader_of("q").kill9(); rabbit_cluster.wait_for_leader("q")
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote

import pytest
from netutil import free_port

INSTALL = "rabbitmq-server is not installed: apt-get install rabbitmq-server"
RABBITMQ_4_MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # RabbitMQ 4's default max_message_size (3.10: 128 MiB)

# Debian's /usr/sbin/rabbitmq-* wrappers switch to the 'rabbitmq' user (and its cookie); the real scripts run as
# whoever calls them, with $HOME (and so the cookie) we choose.
_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
_RUN_PREFIX = "mqexec-rabbit-"
_node_numbers = itertools.count(1)
_ports_given: set[int] = set()


# --------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class NodeSettings:
    """What a node runs with: ``rabbitmq.conf`` lines, ``advanced.config`` entries ``(app, key, Erlang term)``
    and plugins. Presets add up: ``consumer_timeout() + max_message_size()``."""

    conf: tuple[str, ...] = ()
    advanced: tuple[tuple[str, str, str], ...] = ()
    plugins: tuple[str, ...] = ()

    def __add__(self, other: NodeSettings) -> NodeSettings:
        return NodeSettings(self.conf + other.conf, self.advanced + other.advanced, self.plugins + other.plugins)

    def advanced_config(self) -> str:
        apps: dict[str, list[str]] = {}
        for app, key, term in self.advanced:
            apps.setdefault(app, []).append(f"{{{key}, {term}}}")
        return "[" + ",\n ".join(f"{{{app}, [{', '.join(entries)}]}}" for app, entries in apps.items()) + "].\n"


def consumer_timeout(ms: int = 20_000, *, tick_ms: int = 1_000) -> NodeSettings:
    """Close a channel whose oldest delivery stays unacked longer than ``ms`` (``PRECONDITION_FAILED``).

    RabbitMQ 3.10 checks this only on a channel tick (``rabbit_channel:handle_info(tick, ...)`` →
    ``evaluate_consumer_timeout``), every ``rabbit.channel_tick_interval`` ms — 60000 by default
    (deps/rabbit/Makefile) and not in rabbitmq.conf's schema, so the tick is shortened in advanced.config."""
    return NodeSettings(
        conf=(f"consumer_timeout = {ms}",), advanced=(("rabbit", "channel_tick_interval", str(tick_ms)),)
    )


def max_message_size(size: int = RABBITMQ_4_MAX_MESSAGE_SIZE) -> NodeSettings:
    """Refuse bodies over ``size`` bytes (the channel closes with ``PRECONDITION_FAILED``), as RabbitMQ 4 does."""
    return NodeSettings(conf=(f"max_message_size = {size}",))


def external_auth() -> NodeSettings:
    """Offer client-certificate login (SASL EXTERNAL; the user is the certificate's CN) besides passwords."""
    return NodeSettings(
        conf=(
            "auth_mechanisms.1 = PLAIN",
            "auth_mechanisms.2 = AMQPLAIN",
            "auth_mechanisms.3 = EXTERNAL",
            "ssl_cert_login_from = common_name",
        ),
        plugins=("rabbitmq_auth_mechanism_ssl",),
    )


# ------------------------------------------------------------------------------------------------------- TLS
@dataclass(frozen=True)
class ServerTls:
    """A node's TLS files: the CA it trusts for client certificates, its certificate and key."""

    cacert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsPki:
    """A throw-away PKI for amqps tests (see :func:`make_tls_pki`)."""

    ca: Path  # signed every certificate below
    wrong_ca: Path  # signed nothing used here: a client trusting only it must fail
    server: ServerTls  # CN localhost, SAN localhost + 127.0.0.1
    wrong_host: ServerTls  # the right CA, but named only wrong-host.invalid
    client_cert: Path  # for EXTERNAL login as ``client_cn``
    client_key: Path
    client_cn: str

    def client_ssl(self, ca: Path | None = None, *, client_cert: bool = False) -> dict[str, Any]:
        """kombu's ``ssl=`` for a verifying client: ``Connection(url, ssl=pki.client_ssl())``.

        ``server_hostname: None`` makes kombu check the certificate against the URL's host (py-amqp checks no
        host name at all when the key is missing)."""
        opts: dict[str, Any] = {"ca_certs": str(ca or self.ca), "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": None}
        if client_cert:
            opts |= {"certfile": str(self.client_cert), "keyfile": str(self.client_key)}
        return opts


def make_tls_pki(directory: Path, client_cn: str = "mqexec-tls-client") -> TlsPki:
    """Two CAs, a good and a wrongly named server certificate, a client certificate (EC keys, openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "openssl.cnf").write_text("[req]\ndistinguished_name = dn\n[dn]\n")
    ca = ("basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign")
    leaf = ("basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature")
    server = (*leaf, "extendedKeyUsage=serverAuth")
    _openssl_cert(directory, "ca", "mqexec test CA", ca)
    _openssl_cert(directory, "wrong-ca", "mqexec wrong CA", ca)
    _openssl_cert(directory, "server", "localhost", (*server, "subjectAltName=DNS:localhost,IP:127.0.0.1"), "ca")
    _openssl_cert(
        directory, "wrong-host", "wrong-host.invalid", (*server, "subjectAltName=DNS:wrong-host.invalid"), "ca"
    )
    _openssl_cert(directory, "client", client_cn, (*leaf, "extendedKeyUsage=clientAuth"), "ca")
    pem = functools.partial(Path.joinpath, directory)
    return TlsPki(
        ca=pem("ca.pem"),
        wrong_ca=pem("wrong-ca.pem"),
        server=ServerTls(pem("ca.pem"), pem("server.pem"), pem("server.key")),
        wrong_host=ServerTls(pem("ca.pem"), pem("wrong-host.pem"), pem("wrong-host.key")),
        client_cert=pem("client.pem"),
        client_key=pem("client.key"),
        client_cn=client_cn,
    )


def _openssl_cert(directory: Path, name: str, cn: str, extensions: Sequence[str], issuer: str | None = None) -> None:
    cmd = ["openssl", "req", "-x509", "-new", "-config", "openssl.cnf", "-newkey", "ec"]
    cmd += ["-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc", "-days", "30", "-subj", f"/O=mqexec-test/CN={cn}"]
    cmd += ["-keyout", f"{name}.key", "-out", f"{name}.pem", "-addext", "subjectKeyIdentifier=hash"]
    if issuer:
        cmd += ["-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key", "-addext", "authorityKeyIdentifier=keyid:always"]
    for ext in extensions:
        cmd += ["-addext", ext]
    subprocess.run(cmd, cwd=directory, check=True, capture_output=True, timeout=30)


# ------------------------------------------------------------------------------------------------ processes
def _script(name: str) -> str:
    if (_SCRIPTS / name).exists():
        return str(_SCRIPTS / name)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(INSTALL)
    return found


def _beam_pids(needle: bytes) -> list[int]:
    """OS pids of live Erlang VMs whose command line contains ``needle``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"beam" in cmdline.split(b"\0", 1)[0] and needle in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


def _kill_beams(needle: bytes, timeout: float = 15.0) -> None:
    """SIGKILL the VMs matching ``needle`` and wait until they are gone."""
    pids = _beam_pids(needle)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    # by pid, not by command line: a VM freeing its memory has an empty cmdline for a while, not yet a zombie
    while left := [pid for pid in pids if process_running(pid)] or _beam_pids(needle):
        if time.monotonic() > deadline:
            raise RuntimeError(f"RabbitMQ VMs {left} survived SIGKILL for {timeout:.0f} s")
        time.sleep(0.05)


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans() -> list[Path]:
    """Kill the nodes and delete the run directories of test runs whose pytest process is gone; returns them."""
    swept = []
    for run in Path(tempfile.gettempdir()).glob(f"{_RUN_PREFIX}*-*"):
        owner = run.name.removeprefix(_RUN_PREFIX).split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and not _alive(int(owner)):
            _kill_beams(f"{run}/".encode())
            shutil.rmtree(run, ignore_errors=True)
            swept.append(run)
    return swept


def _new_port() -> int:
    """A free loopback port not yet handed to another node of this run."""
    while (port := free_port()) in _ports_given:
        pass
    _ports_given.add(port)
    return port


@functools.cache
def _run_dir() -> Path:
    """This process's run directory with its Erlang cookie; created (after a sweep) on first use."""
    sweep_orphans()
    run = Path(tempfile.mkdtemp(prefix=f"{_RUN_PREFIX}{os.getpid()}-"))
    (run / "home").mkdir()
    cookie = run / "home" / ".erlang.cookie"
    cookie.write_text(secrets.token_hex(20).upper())
    cookie.chmod(0o400)
    atexit.register(_remove_run, run)
    return run


def _remove_run(run: Path) -> None:
    if run.exists():
        _kill_beams(f"{run}/".encode())
        shutil.rmtree(run, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- node
class PrivateNode:
    """A RabbitMQ node of this test run on its own free ports and data directory.

    node = PrivateNode(consumer_timeout()).start()
    node.url()                  # amqp://guest:guest@127.0.0.1:<amqp_port>//
    node.kill9(); node.start()  # the same data dir and ports
    node.remove()
    """

    def __init__(
        self, settings: NodeSettings | None = None, *, tls: ServerTls | None = None, management: bool = False
    ) -> None:
        run = _run_dir()
        self.name = f"mqt{os.getpid()}n{next(_node_numbers)}@localhost"
        self.dir = run / self.name.split("@")[0]
        self.settings = settings or NodeSettings()
        self.tls = tls
        self.amqp_port, self.dist_port = _new_port(), _new_port()
        self.amqps_port = _new_port() if tls else None
        self.management_port = _new_port() if management else None
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: list[float] = []
        self._home = self.dir / "home"
        self._home.mkdir(parents=True)
        shutil.copy2(run / "home" / ".erlang.cookie", self._home)

    # ---- lifecycle
    def start(self, timeout: float = 90.0) -> Self:
        """Start (or restart on the same data dir) and return once the node accepts an AMQP login."""
        self._launch()
        self._await_login(timeout)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Stop gracefully (``rabbitmqctl shutdown``); data and ports are kept for :meth:`start`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.ctl("shutdown", timeout=timeout)
        self.process.wait(timeout)

    def kill9(self) -> int:
        """``kill -9`` the node's Erlang VM, as a crash or power cut would; returns its OS pid."""
        pid = self.beam_pid
        os.kill(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)  # the rabbitmq-server shell exits with its VM
        return pid

    def remove(self) -> None:
        """Kill the node if it runs and delete its directory (safe to call twice)."""
        _kill_beams(b"\0" + str(self._home).encode() + b"\0")
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        """Whether the node's process is alive (it may still be booting)."""
        return self.process is not None and self.process.poll() is None

    @property
    def beam_pid(self) -> int:
        """OS pid of the running Erlang VM, from the pid file RabbitMQ writes at boot."""
        try:
            pid = int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"RabbitMQ node {self.name} has no pid file (not started?)") from exc
        if pid not in _beam_pids(b"\0" + str(self._home).encode() + b"\0"):
            raise RuntimeError(f"RabbitMQ node {self.name} is not running (its pid file names {pid})")
        return pid

    # ---- control
    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <this node> *args`` → stdout; a failure raises naming the command, not its arguments."""
        try:
            done = subprocess.run(
                [_script("rabbitmqctl"), "-n", self.name, *args],
                env=self._env(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"rabbitmqctl {args[0]} on {self.name} did not finish in {timeout:.0f} s") from None
        if done.returncode:
            detail = (done.stderr or done.stdout).strip()[-600:]
            raise RuntimeError(f"rabbitmqctl {args[0]} on {self.name} failed ({done.returncode}): {detail}")
        return done.stdout

    def close_all_connections(self, reason: str = "mqexec test: connection blip", vhost: str | None = None) -> None:
        """Close every client connection — of all vhosts, or of ``vhost`` — as an operator or a blip would
        (``rabbitmqctl close_all_connections --global``; without ``--global`` it closes vhost "/" only)."""
        self.ctl("close_all_connections", *(("--global",) if vhost is None else ("--vhost", vhost)), reason)

    def add_vhost(self, vhost: str) -> None:
        self.ctl("add_vhost", vhost)

    def add_user(self, user: str, password: str | None = None) -> None:
        """Add a user; ``password=None`` makes one that can only log in by certificate (EXTERNAL)."""
        self.ctl("add_user", user, password if password is not None else secrets.token_urlsafe(24))
        if password is None:
            self.ctl("clear_password", user)

    def set_permissions(
        self, user: str, vhost: str = "/", configure: str = ".*", write: str = ".*", read: str = ".*"
    ) -> None:
        self.ctl("set_permissions", "-p", vhost, user, configure, write, read)

    def url(self, user: str | None = "guest", password: str = "guest", vhost: str = "/", *, tls: bool = False) -> str:
        """``amqp://user:password@127.0.0.1:<port>/<vhost>``; ``tls=True`` → the amqps port; ``user=None`` → no
        credentials in the URL (EXTERNAL login)."""
        port = self.amqps_port if tls else self.amqp_port
        if port is None:
            raise ValueError(f"RabbitMQ node {self.name} has no TLS listener (PrivateNode(tls=...))")
        auth = "" if user is None else f"{quote(user, safe='')}:{quote(password, safe='')}@"
        path = "/" if vhost == "/" else quote(vhost, safe="")
        return f"{'amqps' if tls else 'amqp'}://{auth}127.0.0.1:{port}/{path}"

    def traffic(self, vhost: str | None = None) -> list[ConnectionTraffic]:
        """Bytes through this node per open connection (see :func:`connection_traffic`)."""
        return connection_traffic(self, vhost=vhost)

    def log_tail(self, lines: int = 25) -> str:
        """The end of the node's log (and of its console output): for error messages."""
        parts = []
        for path in (self.dir / "log" / f"{self.name}.log", self.dir / "stdout.log"):
            with contextlib.suppress(OSError):
                parts.append("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    # ---- internals
    def _env(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **inherited,
            "HOME": str(self._home),
            "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _write_files(self) -> None:
        conf = list(self.settings.conf)
        plugins = list(self.settings.plugins)
        if self.tls is not None:
            conf += [
                f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}",
                f"ssl_options.cacertfile = {self.tls.cacert}",
                f"ssl_options.certfile = {self.tls.cert}",
                f"ssl_options.keyfile = {self.tls.key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        if self.management_port is not None:
            conf += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {self.management_port}"]
            plugins.append("rabbitmq_management")
        (self.dir / "rabbitmq.conf").write_text("".join(f"{line}\n" for line in conf))
        (self.dir / "advanced.config").write_text(self.settings.advanced_config())
        (self.dir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (it names rabbit@localhost)

    def _launch(self) -> None:
        if self.running:
            raise RuntimeError(f"RabbitMQ node {self.name} is already running")
        self._write_files()
        self._started_at = time.monotonic()
        with open(self.dir / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                [_script("rabbitmq-server")],
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _await_login(self, timeout: float) -> None:
        import amqp

        deadline = self._started_at + timeout
        while True:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise RuntimeError(f"RabbitMQ node {self.name} exited ({code}) while starting:\n{self.log_tail()}")
            conn = amqp.Connection(f"127.0.0.1:{self.amqp_port}", login_method="PLAIN", connect_timeout=2)
            try:
                conn.connect()
                break
            except Exception as exc:  # refused, reset, not yet booted: all mean "try again"
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"RabbitMQ node {self.name} accepted no AMQP login within {timeout:.0f} s "
                        f"({type(exc).__name__}: {exc}):\n{self.log_tail()}"
                    ) from None
                time.sleep(0.25)
            finally:
                with contextlib.suppress(Exception):
                    conn.collect()
        self.startup_seconds.append(time.monotonic() - self._started_at)


def start_nodes(nodes: Sequence[PrivateNode], timeout: float = 120.0) -> None:
    """Start several nodes at once (they boot in parallel) and return when all accept logins."""
    for node in nodes:
        node._launch()
    for node in nodes:
        node._await_login(timeout)


# -------------------------------------------------------------------------------------------------- traffic
@dataclass(frozen=True)
class ConnectionTraffic:
    """One open AMQP connection as the broker counts it: ``recv_oct`` bytes in, ``send_oct`` bytes out."""

    user: str
    vhost: str
    peer_port: int  # the client's local port
    recv_oct: int
    send_oct: int


def connection_traffic(node: PrivateNode | None = None, *, vhost: str | None = None) -> list[ConnectionTraffic]:
    """Bytes per open connection (``rabbitmqctl list_connections``); ``node=None`` reads the shared node.

    sum(c.recv_oct for c in connection_traffic(node, vhost="v"))   # bytes the broker received in vhost v
    Closed connections are no longer listed: read before closing."""
    args = ("-q", "list_connections", "user", "vhost", "peer_port", "recv_oct", "send_oct", "--formatter", "json")
    if node is not None:
        out = node.ctl(*args)
    else:  # the system's rabbitmqctl and its default node; read-only
        out = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [ConnectionTraffic(**row) for row in json.loads(out or "[]")]
    return [row for row in rows if vhost is None or row.vhost == vhost]


def traffic_of_port(local_port: int, node: PrivateNode | None = None) -> ConnectionTraffic:
    """The broker's counts for the client connection whose local port is ``local_port``."""
    for row in connection_traffic(node):
        if row.peer_port == local_port:
            return row
    raise LookupError(f"the broker lists no connection from local port {local_port}")


# -------------------------------------------------------------------------------------------------- cluster
class Cluster:
    """Private nodes joined into one RabbitMQ cluster; quorum queues replicate across them.

    cluster = Cluster.start(3)
    Connection(cluster.failover_url())      # kombu tries the nodes in turn
    cluster.leader_of("tasks").kill9(); cluster.wait_for_leader("tasks"); cluster.heal()
    """

    def __init__(self, nodes: Sequence[PrivateNode]) -> None:
        self.nodes = tuple(nodes)

    @classmethod
    def start(cls, size: int = 3, settings: NodeSettings | None = None, timeout: float = 120.0) -> Cluster:
        """Boot ``size`` nodes in parallel; join the others to the first (stop_app, join_cluster, start_app)."""
        cluster = cls([PrivateNode(settings) for _ in range(size)])
        try:
            start_nodes(cluster.nodes, timeout)
            first, *others = cluster.nodes
            for node in others:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.name)
                node.ctl("start_app", timeout=timeout)  # returns once the app (and its listeners) runs
        except BaseException:
            cluster.remove()
            raise
        return cluster

    def failover_url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        """kombu's failover form: every node's URL, ``;``-separated."""
        return ";".join(node.url(user, password, vhost) for node in self.nodes)

    def running_nodes(self) -> list[str]:
        """Node names the cluster reports running (asked of a live member)."""
        status = json.loads(self._live().ctl("cluster_status", "--formatter", "json"))
        return sorted(status["running_nodes"])

    def leader_of(self, queue: str, vhost: str = "/") -> PrivateNode:
        """The node leading quorum queue ``queue`` now (``rabbitmqctl list_queues name leader``)."""
        out = self._live().ctl("-q", "list_queues", "-p", vhost, "name", "leader", "--formatter", "json", timeout=30)
        for row in json.loads(out or "[]"):
            if row["name"] == queue:
                return self._node(row["leader"])
        raise LookupError(f"no queue {queue!r} in vhost {vhost!r} on the cluster")

    def wait_for_leader(self, queue: str, vhost: str = "/", timeout: float = 60.0) -> PrivateNode:
        """Wait until a running node leads ``queue`` (after its leader died) and return that node."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(LookupError, RuntimeError):
                leader = self.leader_of(queue, vhost)
                if leader.running:
                    return leader
            if time.monotonic() > deadline:
                raise RuntimeError(f"no running node leads quorum queue {queue!r} after {timeout:.0f} s")
            time.sleep(0.2)

    def heal(self, timeout: float = 120.0) -> None:
        """Restart the members that are down; they rejoin with their data."""
        start_nodes([node for node in self.nodes if not node.running], timeout)

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()

    def _live(self) -> PrivateNode:
        for node in self.nodes:
            if node.running:
                return node
        raise RuntimeError("no node of the cluster is running")

    def _node(self, name: str) -> PrivateNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LookupError(f"{name!r} is not a node of this cluster")


@dataclass
class TlsBrokers:
    """Two TLS nodes: ``node`` presents ``pki.server`` (and takes EXTERNAL logins), ``wrong_host`` presents a
    certificate of the right CA for another host name."""

    pki: TlsPki
    node: PrivateNode
    wrong_host: PrivateNode

    @classmethod
    def start(cls, directory: Path) -> TlsBrokers:
        pki = make_tls_pki(directory)
        brokers = cls(pki, PrivateNode(external_auth(), tls=pki.server), PrivateNode(tls=pki.wrong_host))
        try:
            start_nodes([brokers.node, brokers.wrong_host])
            brokers.node.add_user(pki.client_cn)  # no password: certificate login only
            brokers.node.set_permissions(pki.client_cn)
        except BaseException:
            brokers.remove()
            raise
        return brokers

    def heal(self) -> None:
        start_nodes([node for node in (self.node, self.wrong_host) if not node.running])

    def remove(self) -> None:
        self.node.remove()
        self.wrong_host.remove()
        shutil.rmtree(self.pki.ca.parent, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- fixtures
class _Shared(Protocol):
    def heal(self) -> None: ...
    def remove(self) -> None: ...


_T = TypeVar("_T", bound=_Shared)


def _session_shared(request: pytest.FixtureRequest, key: pytest.StashKey[_T], make: Callable[[], _T]) -> _T:
    """One ``make()`` per session, removed when the session ends, healed before each test that asks for it."""
    stash = request.session.stash
    if key not in stash:
        stash[key] = make()
        request.session.addfinalizer(stash[key].remove)
    shared = stash[key]
    shared.heal()
    return shared


def _require_rabbitmq() -> None:
    if not (_SCRIPTS / "rabbitmq-server").exists() and shutil.which("rabbitmq-server") is None:
        pytest.fail(INSTALL, pytrace=False)


_TLS = pytest.StashKey[TlsBrokers]()
_CLUSTER = pytest.StashKey[Cluster]()


@pytest.fixture(name="rabbit_node")
def fixture_rabbit_node() -> Iterator[Callable[..., PrivateNode]]:
    """``rabbit_node(settings, tls=None, management=False)`` → a started :class:`PrivateNode`, removed after the
    test whatever happened to it."""
    _require_rabbitmq()
    nodes: list[PrivateNode] = []

    def make(
        settings: NodeSettings | None = None, *, tls: ServerTls | None = None, management: bool = False
    ) -> PrivateNode:
        nodes.append(PrivateNode(settings, tls=tls, management=management))
        return nodes[-1].start()

    yield make
    for node in nodes:
        node.remove()


@pytest.fixture(name="rabbit_tls")
def fixture_rabbit_tls(request: pytest.FixtureRequest) -> TlsBrokers:
    """The session's :class:`TlsBrokers` (started on first use, restarted if a test killed one)."""
    _require_rabbitmq()
    return _session_shared(request, _TLS, lambda: TlsBrokers.start(_run_dir() / "pki"))


@pytest.fixture(name="rabbit_cluster")
def fixture_rabbit_cluster(request: pytest.FixtureRequest) -> Cluster:
    """The session's 3-node :class:`Cluster` (started on first use, killed members restarted before each test)."""
    _require_rabbitmq()
    return _session_shared(request, _CLUSTER, Cluster.start)
