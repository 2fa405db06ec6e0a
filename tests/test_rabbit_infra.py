"""Tests of the fault-test infrastructure: private RabbitMQ nodes (tests/rabbit.py), their presets, TLS, a
3-node cluster, broker byte counts and the freezable relay (tests/halfopen.py). Real brokers throughout.

Measured figures are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import amqp
import pytest
from halfopen import HalfOpenRelay
from kombu import Connection
from rabbit import (
    RABBITMQ_4_MAX_MESSAGE_SIZE,
    Cluster,
    PrivateNode,
    TlsBrokers,
    connection_traffic,
    consumer_timeout,
    fixture_rabbit_cluster,  # noqa: F401 - the rabbit_cluster fixture
    fixture_rabbit_node,  # noqa: F401 - the rabbit_node fixture
    fixture_rabbit_tls,  # noqa: F401 - the rabbit_tls fixture
    max_message_size,
    process_running,
    sweep_orphans,
    traffic_of_port,
)

TESTS = Path(__file__).resolve().parent
TIMEOUT_MS = 5_000  # the consumer_timeout tested here (the preset's default, 20 s, works the same way)
MiB = 1024 * 1024


def _local_port(conn: Connection) -> int:
    return int(conn.connection.sock.getsockname()[1])


def _publish(conn: Connection, queue: str, bodies: list[bytes], **queue_args: object) -> None:
    """Declare a durable queue and publish persistent messages, each confirmed by the broker."""
    channel = conn.channel()
    channel.queue_declare(queue, durable=True, auto_delete=False, arguments=queue_args or None)
    for body in bodies:
        channel.basic_publish_confirm(amqp.Message(body, delivery_mode=2), exchange="", routing_key=queue)


def _drain(conn: Connection, queue: str, expected: int, timeout: float) -> list[bytes]:
    """Get and ack up to ``expected`` messages, waiting at most ``timeout`` seconds."""
    channel = conn.channel()
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(bodies) < expected and time.monotonic() < deadline:
        message = channel.basic_get(queue)
        if message is None:
            time.sleep(0.1)
            continue
        bodies.append(bytes(message.body))
        channel.basic_ack(message.delivery_tag)
    return bodies


# ------------------------------------------------------------------------------------------ node lifecycle
def test_node_keeps_users_and_messages_across_stop_and_kill9(rabbit_node: Callable[..., PrivateNode]) -> None:
    node = rabbit_node()
    assert 5672 not in (node.amqp_port, node.dist_port)
    node.add_vhost("v1")
    node.add_user("alice", "s3cret pass/word")
    node.set_permissions("alice", "v1")
    url = node.url("alice", "s3cret pass/word", "v1")
    with Connection(url, connect_timeout=5) as conn:
        _publish(conn, "kept", [b"m1"])
    assert node.ctl("eval", "os:getpid().").strip().strip('"') == str(node.beam_pid)

    with Connection(url, connect_timeout=5) as conn:  # a blip: the broker closes the connection, names why
        conn.connect()
        node.close_all_connections("infra test blip")
        with pytest.raises(amqp.exceptions.ConnectionForced, match="infra test blip"):
            conn.drain_events(timeout=10)

    node.stop()
    assert not node.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.amqp_port), timeout=5)
    node.start()
    with Connection(url, connect_timeout=5) as conn:
        _publish(conn, "kept", [b"m2"])

    pid = node.kill9()
    assert not node.running and not process_running(pid)
    node.start()
    with Connection(url, connect_timeout=5) as conn:
        assert _drain(conn, "kept", 2, timeout=10) == [b"m1", b"m2"]
    print(f"\nprivate node start-up: fresh, after stop, after kill -9: {[round(s, 1) for s in node.startup_seconds]} s")
    assert len(node.startup_seconds) == 3

    node.remove()
    assert not node.dir.exists()
    assert not node.running


_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
from rabbit import PrivateNode
node = PrivateNode().start()
print(node.dir, node.beam_pid, flush=True)
os.kill(os.getpid(), signal.{signal})
time.sleep(60)
"""


def test_nodes_of_an_interrupted_or_killed_run_are_removed() -> None:
    """Ctrl-C: the run's atexit hook removes its nodes. SIGKILL: the next run's sweep does."""
    children = {
        sig: subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_CHILD.format(tests=str(TESTS), signal=sig))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for sig in ("SIGINT", "SIGKILL")
    }
    left: dict[str, tuple[Path, int]] = {}
    for sig, child in children.items():
        out, err = child.communicate(timeout=120)
        assert out, f"the {sig} child started no node: {err[-2000:]}"
        node_dir, pid = out.split()
        left[sig] = (Path(node_dir), int(pid))

    interrupted_dir, interrupted_pid = left["SIGINT"]
    assert children["SIGINT"].returncode != 0
    assert not interrupted_dir.parent.exists() and not process_running(interrupted_pid)

    killed_dir, killed_pid = left["SIGKILL"]
    assert children["SIGKILL"].returncode == -signal.SIGKILL
    assert process_running(killed_pid), "a SIGKILLed run leaves its node running (nothing could stop it)"
    assert killed_dir.parent in sweep_orphans()
    assert not killed_dir.parent.exists() and not process_running(killed_pid)


# ------------------------------------------------------------------------------------------------- presets
@pytest.fixture(scope="module")
def limits_node() -> Iterator[PrivateNode]:
    """One node for both limits (a short consumer_timeout, RabbitMQ 4's max_message_size), with management."""
    node = PrivateNode(consumer_timeout(TIMEOUT_MS) + max_message_size(), management=True).start()
    yield node
    node.remove()


def test_consumer_timeout_closes_an_unacked_channel_within_seconds(limits_node: PrivateNode) -> None:
    conn = amqp.Connection(f"127.0.0.1:{limits_node.amqp_port}", login_method="PLAIN", connect_timeout=5)
    conn.connect()
    try:
        channel = conn.channel()
        queue = f"ct-{uuid.uuid4().hex[:8]}"
        channel.queue_declare(queue, auto_delete=True)
        channel.basic_publish(amqp.Message(b"long task"), routing_key=queue)
        received: list[float] = []
        channel.basic_consume(queue, callback=lambda message: received.append(time.monotonic()))  # never acked
        with pytest.raises(amqp.exceptions.PreconditionFailed) as closed:
            deadline = time.monotonic() + 6 * TIMEOUT_MS / 1000
            while time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=0.5)
        held = time.monotonic() - received[0]
    finally:
        conn.collect()
    print(f"\nconsumer_timeout {TIMEOUT_MS} ms: channel closed after holding the delivery {held:.1f} s: {closed.value}")
    assert closed.value.reply_code == 406
    assert "delivery acknowledgement on channel 1 timed out" in str(closed.value)
    assert f"Timeout value used: {TIMEOUT_MS} ms" in str(closed.value)
    assert held < 2 * TIMEOUT_MS / 1000


def test_max_message_size_refuses_a_17_mib_publish(limits_node: PrivateNode) -> None:
    queue = f"big-{uuid.uuid4().hex[:8]}"
    with Connection(limits_node.url(), connect_timeout=5) as conn:
        _publish(conn, queue, [b"x" * (15 * MiB)])  # under the limit: accepted
        with pytest.raises(amqp.exceptions.PreconditionFailed) as refused:
            _publish(conn, queue, [b"x" * (17 * MiB)])
    print(f"\n17 MiB publish: {refused.value}")
    assert refused.value.reply_code == 406
    assert f"is larger than configured max size {RABBITMQ_4_MAX_MESSAGE_SIZE}" in str(refused.value)


def test_management_plugin_answers_on_its_own_port(limits_node: PrivateNode) -> None:
    import requests

    api = f"http://127.0.0.1:{limits_node.management_port}/api"
    overview = requests.get(f"{api}/overview", auth=("guest", "guest"), timeout=10).json()
    assert overview["node"] == limits_node.name
    assert {"port": limits_node.amqp_port, "protocol": "amqp"}.items() <= overview["listeners"][0].items()


# ------------------------------------------------------------------------------------------------- traffic
def test_connection_traffic_counts_bytes_both_ways(limits_node: PrivateNode) -> None:
    queue = f"bytes-{uuid.uuid4().hex[:8]}"
    with Connection(limits_node.url(), connect_timeout=5) as conn:
        conn.connect()
        port = _local_port(conn)
        before = traffic_of_port(port, limits_node)
        _publish(conn, queue, [b"x" * MiB])
        sent = traffic_of_port(port, limits_node)
        assert _drain(conn, queue, 1, timeout=10) == [b"x" * MiB]
        received = traffic_of_port(port, limits_node)
        assert received in limits_node.traffic(vhost="/") and not connection_traffic(limits_node, vhost="other")
    assert (before.user, before.vhost) == ("guest", "/")
    assert MiB < sent.recv_oct - before.recv_oct < 1.1 * MiB
    assert MiB < received.send_oct - sent.send_oct < 1.1 * MiB


def test_connection_traffic_reads_the_shared_node(broker_url: str) -> None:
    parts = urlsplit(broker_url)
    if (parts.hostname, parts.port or 5672) != ("127.0.0.1", 5672):
        pytest.skip(f"connection_traffic() reads the local default node; the test broker is {parts.hostname}")
    with Connection(broker_url, connect_timeout=5) as conn:
        conn.connect()
        row = traffic_of_port(_local_port(conn))
    assert row.recv_oct > 0 and row.send_oct > 0


# ----------------------------------------------------------------------------------------------------- TLS
def _tls_connect(url: str, ssl_options: dict[str, object], **kwargs: object) -> float:
    """Connect (and close); returns the seconds it took."""
    start = time.monotonic()
    with Connection(url, ssl=ssl_options, connect_timeout=10, **kwargs) as conn:
        conn.connect()
    return time.monotonic() - start


def test_amqps_with_the_right_ca_logs_in(rabbit_tls: TlsBrokers) -> None:
    url = rabbit_tls.node.url(tls=True)
    assert url.startswith("amqps://guest:guest@127.0.0.1:")
    _tls_connect(url, rabbit_tls.pki.client_ssl())
    _tls_connect(url.replace("127.0.0.1", "localhost"), rabbit_tls.pki.client_ssl())


def test_amqps_with_a_wrong_ca_or_host_fails_within_seconds(rabbit_tls: TlsBrokers) -> None:
    pki = rabbit_tls.pki
    cases = {
        "wrong CA": (rabbit_tls.node.url(tls=True), pki.client_ssl(ca=pki.wrong_ca), "certificate verify failed"),
        "wrong host": (rabbit_tls.wrong_host.url(tls=True), pki.client_ssl(), "IP address mismatch"),
    }
    for case, (url, options, reason) in cases.items():
        start = time.monotonic()
        with pytest.raises(ssl.SSLCertVerificationError, match=reason) as failed:
            _tls_connect(url, options)
        took = time.monotonic() - start
        print(f"\namqps {case}: {type(failed.value).__name__}: {failed.value} (after {took:.2f} s)")
        assert took < 10


def test_py_amqp_checks_no_host_name_unless_server_hostname_is_given(rabbit_tls: TlsBrokers) -> None:
    """Why ``client_ssl()`` passes ``server_hostname: None``: without the key, a wrongly named certificate of a
    trusted CA is accepted."""
    options = rabbit_tls.pki.client_ssl()
    del options["server_hostname"]
    _tls_connect(rabbit_tls.wrong_host.url(tls=True), options)


def test_external_login_with_a_client_certificate(rabbit_tls: TlsBrokers) -> None:
    node, pki = rabbit_tls.node, rabbit_tls.pki
    url = node.url(user=None, tls=True)
    with Connection(url, ssl=pki.client_ssl(client_cert=True), login_method="EXTERNAL", connect_timeout=10) as conn:
        conn.connect()
        assert traffic_of_port(_local_port(conn), node).user == pki.client_cn
    with pytest.raises(amqp.exceptions.AccessRefused, match="EXTERNAL"):  # no client certificate: refused
        _tls_connect(url, pki.client_ssl(), login_method="EXTERNAL")


# ------------------------------------------------------------------------------------------------- cluster
def test_quorum_queue_survives_kill9_of_its_leader(rabbit_cluster: Cluster) -> None:
    cluster = rabbit_cluster
    assert cluster.running_nodes() == sorted(node.name for node in cluster.nodes)
    assert [urlsplit(u).port for u in cluster.failover_url().split(";")] == [n.amqp_port for n in cluster.nodes]
    queue = f"qq-{uuid.uuid4().hex[:8]}"
    bodies = [str(i).encode() for i in range(100)]
    with Connection(cluster.nodes[0].url(), connect_timeout=5) as conn:
        _publish(conn, queue, bodies, **{"x-queue-type": "quorum"})

    leader = cluster.leader_of(queue)
    killed = time.monotonic()
    leader.kill9()
    new_leader = cluster.wait_for_leader(queue, timeout=60)
    to_leader = time.monotonic() - killed
    with Connection(cluster.failover_url(), connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=len(cluster.nodes))
        assert urlsplit(conn.as_uri()).port != leader.amqp_port
        got = _drain(conn, queue, 100, timeout=60)
    to_all = time.monotonic() - killed
    print(f"\nquorum leader {leader.name} killed: new leader {new_leader.name} after {to_leader:.1f} s, 100 messages")
    print(f"consumed from another node {to_all:.1f} s after the kill")
    assert new_leader is not leader
    assert sorted(got, key=int) == bodies

    cluster.heal()
    assert cluster.running_nodes() == sorted(node.name for node in cluster.nodes)
    print(f"restart of the killed member: {leader.startup_seconds[-1]:.1f} s")
    with Connection(cluster.failover_url(), connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=3)
        conn.channel().queue_delete(queue)


# ---------------------------------------------------------------------------------------------- half-open
def _poll(conns: list[Connection], seconds: float) -> float | None:
    """Read from and heartbeat-check ``conns`` for ``seconds``; if one raises, return after how long."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for conn in conns:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.1)
            try:
                conn.heartbeat_check()
            except amqp.exceptions.ConnectionForced:
                assert conn is conns[0], "only the first connection heartbeats"
                return time.monotonic() - start
    return None


def test_frozen_relay_is_noticed_by_heartbeats_only(broker_url: str) -> None:
    parts = urlsplit(broker_url)
    with HalfOpenRelay(parts.hostname or "127.0.0.1", parts.port or 5672) as relay:
        assert urlsplit(relay.url(broker_url)).port == relay.port
        beating = Connection(relay.url(broker_url), heartbeat=2, connect_timeout=5)
        silent = Connection(relay.url(broker_url), connect_timeout=5)
        with beating, silent:
            beating.connect()
            raw = silent.connect().connection
            assert (beating.connection.heartbeat, silent.connection.heartbeat) == (2, 0)
            assert relay.connections == 2
            assert _poll([beating, silent], 5) is None  # healthy: heartbeats flow both ways, nothing raises

            relay.freeze()
            noticed = _poll([beating, silent], 15)
            assert _poll([silent], 4) is None  # heartbeat 0: a dead peer goes unnoticed
            assert noticed is not None and noticed < 10
            print(f"\nfrozen relay: the heartbeat-2 s connection noticed after {noticed:.1f} s, heartbeat 0 never")
            assert relay.connections == 2  # nothing was closed
            with Connection(relay.url(broker_url), connect_timeout=5) as fresh:  # a reconnect gets through
                fresh.channel().queue_declare(queue="", exclusive=True)

            relay.thaw()  # the silent connection was never closed, only held: the same socket works again
            raw.channel().queue_declare(queue="", exclusive=True)
            relay.close()  # now its peers see the end
            with pytest.raises(OSError, match="closed"):
                raw.channel().queue_declare(queue="", exclusive=True)
