"""Broker URLs without a broker: transports by scheme, failover lists, redaction, and the sentences of explain()."""

from __future__ import annotations

import re
import socket
import ssl

import pytest
from amqp.exceptions import AccessRefused, NotAllowed

from mqexec.broker import explain, redact, split_urls, ssl_options, transport_of
from mqexec.config import Config
from mqexec.errors import BrokerError, ConfigError


@pytest.mark.parametrize(
    "url, kombu, quorum, tls",
    [
        ("amqp://guest:guest@127.0.0.1:5672//", "pyamqp", True, False),
        ("pyamqp://h//", "pyamqp", True, False),
        ("AMQPS://u:p@broker.example:5671/vhost", "pyamqp", True, True),
        ("filesystem:///tmp/mqexec-1a2b", "mqfs", False, False),
        ("amqp://a:5672//;amqp://b:5672//", "pyamqp", True, False),
        (" amqps://a:5671// ; amqps://b:5671// ;", "pyamqp", True, True),
    ],
)
def test_the_transport_of_a_url(url: str, kombu: str, quorum: bool, tls: bool) -> None:
    t = transport_of(url)
    assert (t.kombu_scheme, t.quorum, t.confirms, t.heartbeats, t.tls) == (kombu, quorum, quorum, quorum, tls)


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "amqq://u:SECRET@h:5672//",
            r"unknown broker scheme 'amqq' in amqq://u:\*\*\*@h:5672//; did you mean amqp://\?",
        ),
        ("localhost:5672", "unknown broker scheme 'localhost'"),
        ("alice:SECRET@h:5672", "unknown broker scheme 'alice'"),
        ("amqp:u:SECRET@h:5672", r"broker URL amqp:u:\*\*\*@h:5672 lacks '//' after 'amqp:'"),
        ("amqp://u:SECRET@:5672//", "names no host"),
        ("amqp://u:SECRET@h:99999//", "has port '99999': not a number from 1 to 65535"),
        ("amqp://u:SECRET@h:port//", "has port 'port'"),
        ("amqp://a:5672//;filesystem:///tmp/x", "the failover brokers in .* use different transports"),
        ("amqp://a:5672//;amqp://u:SECRET@:5672//", "names no host"),
    ],
)
def test_a_bad_url_is_one_sentence_without_its_password(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        transport_of(url)
    text = str(info.value)
    assert "SECRET" not in text and "\n" not in text


@pytest.mark.parametrize(
    "url, shown",
    [
        ("amqp://guest:SECRET@host:5672//", "amqp://guest:***@host:5672//"),
        ("amqp://u:p@ss:SECRET@host//", "amqp://u:***@host//"),  # '@' and ':' inside the password
        ("amqp:guest:SECRET@host:5672", "amqp:guest:***@host:5672"),  # no '//'
        ("guest:SECRET@host", "guest:***@host"),  # no scheme at all
        ("amqp://a:SECRET@h1//;amqps://b:SECRET@h2//", "amqp://a:***@h1//;amqps://b:***@h2//"),
        ("amqp://guest@host//", "amqp://guest@host//"),  # no password: unchanged
        ("amqp://host:5672//", "amqp://host:5672//"),
        ("filesystem:///tmp/x", "filesystem:///tmp/x"),
    ],
)
def test_redact_hides_every_password_also_in_malformed_urls(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_split_urls() -> None:
    assert split_urls(" amqp://a// ; ;amqp://b// ") == ["amqp://a//", "amqp://b//"]
    assert split_urls("") == []


def test_tls_options_follow_the_config() -> None:
    assert ssl_options(Config.load(broker_url="amqp://h//")) is None
    opts = ssl_options(Config.load(broker_url="amqps://h//", tls_ca="/ca.pem", tls_cert="/me.pem"))
    assert opts == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "server_hostname": None,
        "ca_certs": "/ca.pem",
        "certfile": "/me.pem",
        "keyfile": "/me.pem",
    }


URL = "amqp://alice:SECRET@broker.example:5672/ana"
TLS_URL = "amqps://alice:SECRET@broker.example:5671/ana"


@pytest.mark.parametrize(
    "url, exc, message",
    [
        (URL, AccessRefused("Login was refused"), "refused the login of user 'alice': wrong user name or password"),
        (URL, NotAllowed("access to vhost 'ana' refused"), "does not let this user into vhost 'ana': wrong vhost"),
        (
            TLS_URL,
            ssl.SSLCertVerificationError(1, "certificate verify failed: Hostname mismatch, certificate is not valid"),
            "the TLS certificate of broker.example:5671 is not issued for host 'broker.example'",
        ),
        (
            TLS_URL,
            ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] unable to get local issuer"),
            r"not signed by a CA in the system's CA store .*set tls_ca \(MQEXEC_TLS_CA\)",
        ),
        (
            TLS_URL,
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
            "broker.example:5671 does not speak TLS .*usually 5671",
        ),
        (URL, ConnectionRefusedError(111, "Connection refused"), "nothing accepts connections at broker.example:5672"),
        (URL, socket.gaierror(-2, "Name or service not known"), "cannot resolve the broker host 'broker.example'"),
        (URL, TimeoutError("timed out"), "no answer from broker.example:5672 within 2 s"),
        (
            URL,
            ConnectionResetError(104, "Connection reset by peer"),
            r"closed the connection during the AMQP handshake .* \(is it a TLS port\? use amqps://\)",
        ),
        (URL, OSError("Server unexpectedly closed connection"), "closed the connection during the AMQP handshake"),
        (
            URL,
            RuntimeError("odd failure at amqp://alice:SECRET@broker.example"),
            r"cannot connect to the broker .*: RuntimeError: odd failure at amqp://alice:\*\*\*@broker.example",
        ),
    ],
)
def test_explain_says_why_in_one_sentence_without_the_password(url: str, exc: BaseException, message: str) -> None:
    err = explain(exc, Config.load(broker_url=url, connect_timeout=2), url)
    assert isinstance(err, BrokerError)
    text = str(err)
    assert "SECRET" not in text and "\n" not in text
    assert re.search(message, text), text


def test_explain_names_the_url_that_failed_in_a_failover_list() -> None:
    cfg = Config.load(broker_url="amqp://u:SECRET@a:5672//;amqp://u:SECRET@b:5673//")
    text = str(explain(ConnectionRefusedError(), cfg, "amqp://u:SECRET@b:5673//"))
    assert "at b:5673 (amqp://u:***@b:5673//)" in text
    assert "a:5672" in str(explain(ConnectionRefusedError(), cfg))  # no url: the first of the list


def test_explain_a_login_with_a_missing_client_certificate() -> None:
    cfg = Config.load(broker_url="amqps://h:5671//", tls_cert="/nonexistent/me.pem")
    assert str(explain(OSError("?"), cfg)) == "the client certificate /nonexistent/me.pem does not exist"
    refused = str(explain(AccessRefused("EXTERNAL"), cfg))
    assert "refused the login of certificate /nonexistent/me.pem" in refused
