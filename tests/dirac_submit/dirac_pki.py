"""A throw-away grid PKI for tests: CA → user certificate → RFC 3820 proxy, plus a server certificate.

pki = make_pki(tmp_path)
pki.proxy          # PEM: proxy cert (with DIRAC group dirac_user), its key, user cert — as dirac-proxy-init writes
pki.ca_dir         # hashed CA directory, like /etc/grid-security/certificates
issue_proxy(user, user_key, style="gsi-draft")   # other kinds of proxies (GSI draft, legacy Globus CN=proxy)
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

# ProxyCertInfo with policy language id-ppl-inheritAll (1.3.6.1.5.5.7.21.1): SEQUENCE { SEQUENCE { OID } } in DER,
# under the RFC 3820 OID or the GSI draft's (pre-RFC Globus proxies).
_INHERIT_ALL = bytes.fromhex("300c300a06082b06010505071501")
PROXY_STYLES = {"rfc3820": "1.3.6.1.5.5.7.1.14", "gsi-draft": "1.3.6.1.4.1.3536.1.222"}
DIRAC_GROUP_OID = "1.2.42.42"  # what dirac-proxy-init -g <group> adds, as an IA5String


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
    user_cert: Path  # alice's certificate and key, to make other proxies of her
    user_key: Path


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
    start, end = (
        (now - dt.timedelta(days=2), now - dt.timedelta(hours=1))
        if expired
        else (now - dt.timedelta(minutes=5), now + dt.timedelta(hours=12))
    )
    proxy, proxy_key = issue_proxy(user, user_key, start=start, end=end, group="dirac_user")
    path = tmp / f"x509up_{cn}{'_expired' if expired else ''}"
    path.write_bytes(_pem(proxy) + _key_pem(proxy_key) + _pem(user))
    path.chmod(0o600)
    (tmp / f"usercert_{cn}.pem").write_bytes(_pem(user))
    (tmp / f"userkey_{cn}.pem").write_bytes(_key_pem(user_key))
    return f"/O=mqexec-test/CN={cn}", path


def issue_proxy(
    user: x509.Certificate,
    user_key,
    *,
    style: str = "rfc3820",
    group: str | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A proxy of ``user``: ``style`` rfc3820 / gsi-draft (ProxyCertInfo under that OID, a numeric CN), or legacy /
    limited-legacy (Globus' CN=proxy / CN=limited proxy, no extension); ``group`` as DIRAC's group extension."""
    now = _now()
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
    extensions: list[tuple[x509.ExtensionType, bool]] = [(usage, True)]
    if style in PROXY_STYLES:
        info = x509.UnrecognizedExtension(x509.ObjectIdentifier(PROXY_STYLES[style]), _INHERIT_ALL)
        extensions.append((info, True))
        cn = str(x509.random_serial_number() % 10**9)
    else:
        cn = {"legacy": "proxy", "limited-legacy": "limited proxy"}[style]
    if group is not None:
        der = bytes([0x16, len(group)]) + group.encode()
        extensions.append((x509.UnrecognizedExtension(x509.ObjectIdentifier(DIRAC_GROUP_OID), der), False))
    subject = x509.Name([*user.subject, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    proxy = _cert(
        subject,
        user.subject,
        key,
        user_key,
        start=start or now - dt.timedelta(minutes=5),
        end=end or now + dt.timedelta(hours=12),
        extensions=extensions,
    )
    return proxy, key


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
    return PKI(
        ca_file,
        ca_dir,
        tmp / "hostcert.pem",
        tmp / "hostkey.pem",
        user_dn,
        proxy,
        expired,
        stranger,
        tmp / "usercert_alice.pem",
        tmp / "userkey_alice.pem",
    )
