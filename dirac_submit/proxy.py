"""Find and check the user's credentials: X.509 proxy, grid CA directory, DiracX token.

Errors say what is wrong and how to fix it before any request leaves the machine::

    proxy = load_proxy()                  # $X509_USER_PROXY or /tmp/x509up_u<uid>
    print(proxy.identity, proxy.not_after)
    ca = find_ca("/etc/grid-security/certificates")
    token = load_diracx_token()            # DiracX block of a DIRAC v9 proxy, or diracx's credentials file
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from .errors import CAError, ProxyError

RENEW_HINT = "renew it with: dirac-proxy-init -g <your_group>"
#: ProxyCertInfo extension OIDs: RFC 3820, and the GSI draft (pre-RFC Globus proxies) it came from.
PROXY_CERT_INFO_OIDS = frozenset({"1.3.6.1.5.5.7.1.14", "1.3.6.1.4.1.3536.1.222"})
#: DIRAC's group extension in proxies made by ``dirac-proxy-init -g <group>`` (an IA5String).
DIRAC_GROUP_OID = "1.2.42.42"
_DIRACX_BLOCK = re.compile(r"-----BEGIN DIRACX-----\s*(.*?)\s*-----END DIRACX-----", re.DOTALL)


@dataclass(frozen=True)
class Proxy:
    """A checked X.509 proxy file.

    Attributes:
        path: the PEM file holding the proxy certificate, its key, and the user's certificate chain.
        identity: subject of the user's certificate (the proxy's subject minus the proxy CNs).
        not_after: when the shortest-lived certificate in the chain expires (UTC).
        group: the DIRAC group the proxy was made for (``dirac-proxy-init -g``), when it carries one.
    """

    path: str
    identity: str
    not_after: datetime
    group: str | None = None

    def init_command(self) -> str:
        """The ``dirac-proxy-init`` line that renews this proxy (and uploads it to DIRAC's ProxyManager)."""
        return f"dirac-proxy-init -g {self.group or '<your_group>'}"

    def check(self, margin: timedelta = timedelta(minutes=1)) -> None:
        """Raise :class:`ProxyError` if the proxy is expired (or expires within ``margin``)::

        load_proxy("/tmp/x509up_u1000").check(margin=timedelta(hours=1))
        """
        now = datetime.now(UTC)
        if self.not_after <= now + margin:
            state = "expired" if self.not_after <= now else "expires"
            raise ProxyError(
                f"the X.509 proxy {self.path} ({self.identity}) {state} at "
                f"{self.not_after:%Y-%m-%d %H:%M:%S} UTC; renew it with: {self.init_command()}"
            )


def default_proxy_path() -> str:
    """``$X509_USER_PROXY``, else DIRAC's and VOMS' default ``/tmp/x509up_u<uid>``."""
    return os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.getuid()}"


def load_proxy(path: str | os.PathLike[str] | None = None) -> Proxy:
    """Read and check a proxy file.

    Args:
        path: the proxy file; default :func:`default_proxy_path`.

    Raises:
        ProxyError: the file is missing, has no certificate or key, or is expired.

    Example::

        load_proxy().identity   # '/DC=ch/DC=cern/OU=Users/CN=jdoe'
    """
    where = str(path) if path is not None else default_proxy_path()
    try:
        data = Path(where).read_bytes()
    except FileNotFoundError:
        raise ProxyError(f"no X.509 proxy at {where}; create one with: dirac-proxy-init -g <your_group>") from None
    except OSError as err:
        raise ProxyError(f"cannot read the X.509 proxy {where}: {err}") from err
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise ProxyError(f"{where} holds no PEM certificate ({err}); {RENEW_HINT}") from err
    if b"PRIVATE KEY-----" not in data:
        raise ProxyError(f"{where} holds no private key, so it is not a proxy; {RENEW_HINT}")
    user = end_entity(chain) or chain[-1]
    proxy = Proxy(
        path=where,
        identity=_dn(user.subject),
        not_after=min(c.not_valid_after_utc for c in chain),
        group=_dirac_group(chain[0]),
    )
    proxy.check(margin=timedelta(0))
    return proxy


def find_ca(path: str | os.PathLike[str] | None = None) -> str:
    """Return the CA directory (or bundle file) to verify servers with.

    Args:
        path: explicit directory or file; default ``$X509_CERT_DIR``, else ``/etc/grid-security/certificates``.

    Raises:
        CAError: it does not exist.
    """
    where = str(path) if path is not None else os.environ.get("X509_CERT_DIR", "/etc/grid-security/certificates")
    if not os.path.exists(where):
        raise CAError(
            f"CA directory {where} does not exist; set X509_CERT_DIR (or pass ca_dir=) to the grid CA "
            "directory, e.g. /cvmfs/grid.cern.ch/etc/grid-security/certificates, or install your VO's CA package"
        )
    return where


@dataclass(frozen=True)
class BearerToken:
    """A DiracX access token and when it stops working."""

    access_token: str
    expires_on: datetime | None
    source: str

    def check(self) -> None:
        """Raise :class:`ProxyError` when the token has expired."""
        if self.expires_on is not None and self.expires_on <= datetime.now(UTC):
            raise ProxyError(
                f"the DiracX token from {self.source} expired at {self.expires_on:%Y-%m-%d %H:%M:%S} UTC; "
                "get a new one with: dirac-proxy-init -g <your_group> (DIRAC v9) or dirac login"
            )


def load_diracx_token(proxy_path: str | None = None, credentials_path: str | None = None) -> BearerToken:
    """Find a DiracX bearer token.

    Looks first for the ``-----BEGIN DIRACX-----`` block that DIRAC v9's ``dirac-proxy-init`` appends
    to the proxy file, then for diracx's credentials file (``$DIRACX_CREDENTIALS_PATH``, else
    ``~/.cache/diracx/credentials.json``). Both hold ``{"access_token", "expires_on", ...}``.

    Raises:
        ProxyError: none found, unreadable, or expired.
    """
    proxy_file = proxy_path or default_proxy_path()
    if os.path.exists(proxy_file) and (match := _DIRACX_BLOCK.search(Path(proxy_file).read_text())):
        raw = base64.b64decode("".join(match.group(1).split())).decode()
        token = _token(raw, f"the DiracX block of {proxy_file}")
    else:
        creds = (
            credentials_path
            or os.environ.get("DIRACX_CREDENTIALS_PATH")
            or str(Path.home() / ".cache" / "diracx" / "credentials.json")
        )
        if not os.path.exists(creds):
            raise ProxyError(
                f"no DiracX token: {proxy_file} has no DIRACX block and {creds} does not exist; "
                "run dirac-proxy-init -g <your_group> (DIRAC v9) or dirac login"
            )
        token = _token(Path(creds).read_text(), creds)
    token.check()
    return token


def _token(raw: str, source: str) -> BearerToken:
    try:
        data = json.loads(raw)
        expires = data.get("expires_on")
        return BearerToken(
            access_token=data["access_token"],
            expires_on=datetime.fromtimestamp(int(expires), UTC) if expires is not None else None,
            source=source,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ProxyError(f"cannot read a DiracX token from {source}: {err!r}") from err


def is_proxy(cert: x509.Certificate) -> bool:
    """True for a proxy certificate: a ProxyCertInfo extension (RFC 3820 or the GSI draft), or a legacy Globus
    proxy whose last CN is ``proxy`` or ``limited proxy``::

        is_proxy(x509.load_pem_x509_certificates(open("/tmp/x509up_u1000", "rb").read())[0])   # True
    """
    if any(ext.oid.dotted_string in PROXY_CERT_INFO_OIDS for ext in cert.extensions):
        return True
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return bool(cns) and cns[-1].value in ("proxy", "limited proxy")


def end_entity(chain: list[x509.Certificate]) -> x509.Certificate | None:
    """The first certificate of a chain (proxy first) that is not a proxy: the person's; None if there is none."""
    return next((cert for cert in chain if not is_proxy(cert)), None)


def _dirac_group(cert: x509.Certificate) -> str | None:
    try:
        der = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(DIRAC_GROUP_OID)).value
    except x509.ExtensionNotFound:
        return None
    data = der.value if isinstance(der, x509.UnrecognizedExtension) else b""
    if len(data) < 2 or data[0] != 0x16 or data[1] & 0x80:  # a short IA5String, as DIRAC writes it
        return None
    return data[2 : 2 + data[1]].decode("ascii", "replace") or None


def _dn(name: x509.Name) -> str:
    def text(value: str | bytes) -> str:
        return value if isinstance(value, str) else value.decode("utf-8", "replace")

    return "".join(f"/{attr.rfc4514_attribute_name}={text(attr.value)}" for attr in name)
