"""Outbound only, provably (design decision 8): a worker behind a firewall that drops every inbound connection.

    host namespace                                        namespace mqx-<hex> (INPUT policy DROP)
    ┌──────────────────────────────────────┐   veth /30   ┌────────────────────────────────────────┐
    │ RabbitMQ 127.0.0.1:5672 ◀── socat ◀──┼──────────────┼── mqexec worker (outbound AMQP)         │
    │   relay on <host veth addr>:<port>   │              │   socat listener (inbound: dropped)    │
    │ mqexec.Client ──▶ RabbitMQ           │              │   no default route                     │
    └──────────────────────────────────────┘              └────────────────────────────────────────┘

The namespace accepts only loopback and packets of connections it opened itself (ESTABLISHED,RELATED); its
only way out is the veth to the host's end of the /30. The relay makes the broker see 127.0.0.1, so the
loopback-only ``guest`` user works without creating a RabbitMQ user. Nothing is added to the host's firewall;
the namespace's rules go away with it.

Needs root, ``ip`` (iproute2), ``iptables`` and ``socat``: Debian ``apt-get install iproute2 iptables socat``.
The test fails (never skips) with that line when they are missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from workerproc import ROOT, Worker

N_TASKS = 200
INSTALL = "apt-get install iproute2 iptables socat"


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def _popen(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End a process started here and its children (its own session/process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class NsWorker(Worker):
    """:class:`Worker` started through ``ip netns exec <ns>`` (which execs, so the pid is the worker's)."""

    def __init__(self, ns: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "mqexec", "worker", *args],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class Jail:
    """A network namespace behind an inbound-dropping firewall, tied to the host by a veth /30."""

    ns: str
    host_addr: str
    ns_addr: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def exec(self, *cmd: str) -> str:
        return _run("ip", "netns", "exec", self.ns, *cmd)

    def listeners(self, ns: bool) -> str:
        return self.exec("ss", "-Hltn") if ns else _run("ss", "-Hltn")

    def wait_listening(self, addr: str, port: int, ns: bool, proc: subprocess.Popen[bytes]) -> None:
        """Wait (bounded) until ``addr:port`` is listening, by ``ss`` — without connecting to it."""
        for _ in range(100):
            if f"{addr}:{port} " in self.listeners(ns):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"listener on {addr}:{port} exited with {proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"nothing listens on {addr}:{port} after 5 s")

    def dropped(self) -> int:
        """Packets dropped so far by the namespace's INPUT policy."""
        head = self.exec("iptables", "-w", "-L", "INPUT", "-n", "-v", "-x").splitlines()[0]
        m = re.search(r"policy DROP (\d+) packets", head)
        assert m, head
        return int(m.group(1))


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def _pick_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(a).network for a in re.findall(r"inet (\S+)", _run("ip", "-o", "-4", "addr"))]
    for _ in range(50):
        net = ipaddress.ip_network(f"10.231.{random.randrange(256)}.{4 * random.randrange(64)}/30")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.231.x.y/30 for the test's veth pair")


def _require_tools() -> None:
    missing = [t for t in ("ip", "iptables", "socat", "ss") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        why = "not root" if os.geteuid() != 0 else f"missing {', '.join(missing)}"
        pytest.fail(
            f"the outbound-only test needs root, ip, iptables, socat ({why}): run as root and `{INSTALL}`",
            pytrace=False,
        )


@pytest.fixture
def jail() -> Iterator[Jail]:
    _require_tools()
    tag = uuid.uuid4().hex[:6]
    ns, veth_host, veth_ns = f"mqx-{tag}", f"mqxh{tag}", f"mqxn{tag}"
    net = _pick_subnet()
    host_addr, ns_addr = (str(h) for h in net.hosts())
    made_ns = made_veth = False
    jail = Jail(ns, host_addr, ns_addr)
    try:
        try:
            _run("ip", "netns", "add", ns)
        except RuntimeError as e:
            pytest.fail(
                f"cannot create a network namespace (needs root with CAP_SYS_ADMIN/NET_ADMIN): {e}", pytrace=False
            )
        made_ns = True
        _run("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns)
        made_veth = True
        _run("ip", "link", "set", veth_ns, "netns", ns)
        _run("ip", "addr", "add", f"{host_addr}/30", "dev", veth_host)
        _run("ip", "link", "set", veth_host, "up")
        _run("ip", "-n", ns, "addr", "add", f"{ns_addr}/30", "dev", veth_ns)
        _run("ip", "-n", ns, "link", "set", veth_ns, "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        tables = ["iptables", "ip6tables"] if os.path.exists("/proc/sys/net/ipv6") else ["iptables"]
        for tool in tables:  # inside the namespace only; nothing touches the host's rules
            jail.exec(tool, "-w", "-P", "INPUT", "DROP")
            jail.exec(tool, "-w", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
            jail.exec(tool, "-w", "-A", "INPUT", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
        yield jail
    finally:
        for proc in jail.procs:
            _kill(proc)
        if made_veth:
            with contextlib.suppress(RuntimeError):  # gone with the namespace if it was moved already
                _run("ip", "link", "del", veth_host)
        if made_ns:
            _run("ip", "netns", "del", ns)


def _where_am_i(i: int, host_addr: str) -> tuple[int, int, str]:
    """Runs on the worker: the task number, its network namespace's inode, the address it would send from."""
    import os
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host_addr, 9))  # UDP connect: picks a route and source address, sends nothing
        src = s.getsockname()[0]
    return i, os.stat("/proc/self/ns/net").st_ino, src


def test_worker_behind_inbound_drop_firewall_completes_a_run(jail, broker_url, settings, client, tmp_path, identity):
    # 1. The firewall really drops inbound: a listener inside the namespace accepts from inside, not from us.
    probe_port = _free_port("127.0.0.1")
    listener = _popen(
        [
            "ip",
            "netns",
            "exec",
            jail.ns,
            "socat",
            f"TCP-LISTEN:{probe_port},bind={jail.ns_addr},reuseaddr,fork",
            "SYSTEM:echo inside",
        ],
        tmp_path / "probe-listener.log",
    )
    jail.procs.append(listener)
    jail.wait_listening(jail.ns_addr, probe_port, ns=True, proc=listener)
    inside = jail.exec(
        sys.executable,
        "-c",
        "import socket, sys; s = socket.create_connection((sys.argv[1], "
        "int(sys.argv[2])), timeout=5); print(s.makefile().readline().strip())",
        jail.ns_addr,
        str(probe_port),
    )
    assert inside.strip() == "inside"  # the listener works...
    dropped_before = jail.dropped()
    with pytest.raises(TimeoutError), socket.create_connection((jail.ns_addr, probe_port), timeout=2):
        pass  # ...but our SYN is dropped (no RST, no accept): inbound is blocked
    assert jail.dropped() > dropped_before  # and it was the namespace's INPUT policy that dropped it

    # 2. The worker's only way to the broker: outbound to a loopback relay on the host's end of the veth.
    broker = urlsplit(broker_url)
    relay_port = _free_port(jail.host_addr)
    relay = _popen(
        [
            "socat",
            f"TCP-LISTEN:{relay_port},bind={jail.host_addr},reuseaddr,fork",
            f"TCP:{broker.hostname}:{broker.port or 5672}",
        ],
        tmp_path / "relay.log",
    )
    jail.procs.append(relay)
    jail.wait_listening(jail.host_addr, relay_port, ns=False, proc=relay)
    userinfo = broker.netloc.rsplit("@", 1)[0] + "@" if "@" in broker.netloc else ""
    ns_broker = f"{broker.scheme}://{userinfo}{jail.host_addr}:{relay_port}{broker.path}"

    env = {
        **os.environ,
        "MQEXEC_QUEUE_PREFIX": str(settings["queue_prefix"]),
        "MQEXEC_SECRET": identity.trust.token(),
        "MQEXEC_CACHE_DIR": str(tmp_path / "ns-worker-cache"),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "MQEXEC_LAKE_URL": "",
    }
    worker = NsWorker(
        jail.ns,
        ["--broker", ns_broker, "--hostname", f"ns-{settings['queue_prefix']}@test", "--concurrency", "1"],
        env,
        tmp_path / "ns-worker.log",
    )
    try:
        worker.wait_ready()

        # 3. A run completes, and every task ran inside the namespace.
        results = client.gather(client.map(_where_am_i, range(N_TASKS), [jail.host_addr] * N_TASKS))
        host_netns = os.stat("/proc/self/ns/net").st_ino
        assert sorted(i for i, _, _ in results) == list(range(N_TASKS))
        assert {ino for _, ino, _ in results} == {os.stat(f"/run/netns/{jail.ns}").st_ino}
        assert host_netns not in {ino for _, ino, _ in results}
        assert {src for _, _, src in results} == {jail.ns_addr}

        # 4. The namespace's TCP traffic: only connections it opened, to the relay; nothing listens but the probe.
        established = jail.exec("ss", "-Htn", "state", "established").split("\n")
        peers = {line.split()[-1] for line in established if line.strip()}
        assert peers == {f"{jail.host_addr}:{relay_port}"}, established
        listening = {line.split()[3] for line in jail.listeners(ns=True).splitlines() if line.strip()}
        assert listening == {f"{jail.ns_addr}:{probe_port}"}, listening
        assert worker.proc.poll() is None, worker.text()
    finally:
        worker.stop()
