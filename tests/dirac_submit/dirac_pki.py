"""A throw-away grid PKI for tests: CA → user certificate → RFC 3820 proxy, plus a server certificate.

pki = make_pki(tmp_path)
pki.proxy          # PEM: proxy cert, its key, user cert — what dirac-proxy-init writes
pki.ca_dir         # hashed CA directory, like /etc/grid-security/certificates
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# ProxyCertInfo (RFC 3820, OID 1.3.6.1.5.5.7.1.14) with policy language id-ppl-inheritAll
# (1.3.6.1.5.5.7.21.1): SEQUENCE { SEQUENCE { OID } } in DER.
_PROXY_CERT_INFO = x509.UnrecognizedExtension(
    x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14"),
    bytes.fromhex("300c300a06082b06010505071501"),
)


@dataclass(frozen=True)
class PKI:
    ca_file: Path
    ca_dir: Path
    server_cert: Path
    server_key: Path
    user_dn: str
    proxy: Path
    expired_proxy: Path
    stranger_proxy: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(*cns: str) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mqexec-test")]
    attrs += [x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in cns]
    return x509.Name(attrs)


def _cert(subject, issuer, key, signer, *, start, end, extensions) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _user_and_proxies(tmp: Path, ca, ca_key, cn: str, *, expired: bool = False) -> tuple[str, Path]:
    now = _now()
    user_key = ec.generate_private_key(ec.SECP256R1())
    user_usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
    user = _cert(
        _name(cn),
        ca.subject,
        user_key,
        ca_key,
        start=now - dt.timedelta(days=1),
        end=now + dt.timedelta(days=30),
        extensions=[(x509.BasicConstraints(ca=False, path_length=None), True), (user_usage, True)],
    )
    proxy_key = ec.generate_private_key(ec.SECP256R1())
    serial = str(x509.random_serial_number() % 10**9)
    start, end = (
        (now - dt.timedelta(days=2), now - dt.timedelta(hours=1))
        if expired
        else (now - dt.timedelta(minutes=5), now + dt.timedelta(hours=12))
    )
    proxy = _cert(
        _name(cn, serial),
        user.subject,
        proxy_key,
        user_key,
        start=start,
        end=end,
        extensions=[(_PROXY_CERT_INFO, True), (user_usage, True)],
    )
    path = tmp / f"x509up_{cn}{'_expired' if expired else ''}"
    path.write_bytes(_pem(proxy) + _key_pem(proxy_key) + _pem(user))
    path.chmod(0o600)
    return f"/O=mqexec-test/CN={cn}", path


def make_pki(tmp: Path) -> PKI:
    """Generate everything into ``tmp`` (a few tens of milliseconds with EC keys)."""
    now = _now()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(
        _name("Test Grid CA"),
        _name("Test Grid CA"),
        ca_key,
        ca_key,
        start=now - dt.timedelta(days=1),
        end=now + dt.timedelta(days=60),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),
        ],
    )
    ca_dir = tmp / "certificates"
    ca_dir.mkdir()
    ca_file = ca_dir / "TestGridCA.pem"
    ca_file.write_bytes(_pem(ca))
    subject_hash = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(ca_file)], check=True, capture_output=True, text=True
    ).stdout.strip()
    (ca_dir / f"{subject_hash}.0").symlink_to(ca_file.name)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        _name("localhost"),
        ca.subject,
        server_key,
        ca_key,
        start=now - dt.timedelta(days=1),
        end=now + dt.timedelta(days=30),
        extensions=[
            (
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                False,
            )
        ],
    )
    (tmp / "hostcert.pem").write_bytes(_pem(server))
    (tmp / "hostkey.pem").write_bytes(_key_pem(server_key))

    user_dn, proxy = _user_and_proxies(tmp, ca, ca_key, "alice")
    _, expired = _user_and_proxies(tmp, ca, ca_key, "alice", expired=True)
    _, stranger = _user_and_proxies(tmp, ca, ca_key, "mallory")
    return PKI(ca_file, ca_dir, tmp / "hostcert.pem", tmp / "hostkey.pem", user_dn, proxy, expired, stranger)
