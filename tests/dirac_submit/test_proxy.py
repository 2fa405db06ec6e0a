"""Which certificates are proxies: RFC 3820, the GSI draft before it, and legacy Globus ``CN=proxy``.

mqexec's key service and dirac_submit share this one test of a certificate (``dirac_submit.proxy.is_proxy``);
the two copies it replaced disagreed (one knew only the RFC 3820 OID).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dirac_pki import PKI, issue_proxy

from dirac_submit import end_entity, is_proxy, load_proxy


def _alice(pki: PKI) -> tuple[x509.Certificate, object]:
    user = x509.load_pem_x509_certificate(pki.user_cert.read_bytes())
    key = serialization.load_pem_private_key(pki.user_key.read_bytes(), password=None)
    return user, key


def _write(path: Path, proxy: x509.Certificate, key: object, user: x509.Certificate) -> Path:
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())  # type: ignore[attr-defined]
    path.write_bytes(proxy.public_bytes(pem) + key_pem + user.public_bytes(pem))
    return path


@pytest.mark.parametrize("style", ["rfc3820", "gsi-draft", "legacy", "limited-legacy"])
def test_every_kind_of_proxy_is_a_proxy_and_names_its_user(pki: PKI, tmp_path: Path, style: str) -> None:
    user, key = _alice(pki)
    proxy, proxy_key = issue_proxy(user, key, style=style)
    assert is_proxy(proxy)
    assert not is_proxy(user)
    assert end_entity([proxy, user]) == user
    loaded = load_proxy(_write(tmp_path / "x509up", proxy, proxy_key, user))
    assert loaded.identity == "/O=mqexec-test/CN=alice"
    assert loaded.group is None and loaded.init_command() == "dirac-proxy-init -g <your_group>"


def test_a_proxy_of_a_proxy_still_names_the_user_and_its_dirac_group(pki: PKI, tmp_path: Path) -> None:
    user, key = _alice(pki)
    first, first_key = issue_proxy(user, key, group="dirac_user")
    second, _ = issue_proxy(first, first_key, style="gsi-draft")
    assert end_entity([second, first, user]) == user
    assert end_entity([second, first]) is None  # no person in it
    loaded = load_proxy(_write(tmp_path / "x509up", first, first_key, user))
    assert loaded.group == "dirac_user" and loaded.init_command() == "dirac-proxy-init -g dirac_user"
