"""Grid credentials for the data lake: WLCG bearer tokens and X.509 proxies, found the way grid tools find them.

    environment ──▶ bearer_token()  BEARER_TOKEN → BEARER_TOKEN_FILE → $XDG_RUNTIME_DIR/bt_u$UID → /tmp/bt_u$UID
                ──▶ x509_proxy()    X509_USER_PROXY → /tmp/x509up_u$UID
    webdav_options(options) ──▶ httpx ``auth=`` (Authorization: Bearer, re-read per request) and ``verify=`` (an
                                SSL context: system CAs + X509_CERT_DIR, the proxy as client certificate)

``root://`` needs nothing from here: the XRootD client reads the same variables itself (its ``ztn`` plug-in
follows the WLCG discovery order above; ``gsi`` reads ``X509_USER_PROXY``). Tokens and proxies never appear in
a ``repr``, a log line or an error message::

    >>> opts = webdav_options({})          # {} when there is no credential in the environment
"""

from __future__ import annotations

import os
import ssl
from typing import Any

__all__ = ["bearer_token", "webdav_options", "x509_proxy"]

_GRID_CA_DIR = "/etc/grid-security/certificates"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def bearer_token() -> str | None:
    """The WLCG bearer token of this process, or None: ``BEARER_TOKEN``, then the file ``BEARER_TOKEN_FILE``,
    then ``$XDG_RUNTIME_DIR/bt_u<uid>``, then ``/tmp/bt_u<uid>`` (WLCG Bearer Token Discovery)."""
    if os.environ.get("BEARER_TOKEN", "").strip():
        return os.environ["BEARER_TOKEN"].strip()
    if os.environ.get("BEARER_TOKEN_FILE"):
        return _read(os.environ["BEARER_TOKEN_FILE"])
    name = f"bt_u{os.geteuid()}"
    if os.environ.get("XDG_RUNTIME_DIR"):
        token = _read(os.path.join(os.environ["XDG_RUNTIME_DIR"], name))
        if token:
            return token
    return _read(os.path.join("/tmp", name))


def x509_proxy() -> str | None:
    """Path of the X.509 proxy: ``X509_USER_PROXY``, else ``/tmp/x509up_u<uid>`` if it exists; or None."""
    path = os.environ.get("X509_USER_PROXY") or f"/tmp/x509up_u{os.geteuid()}"
    return path if os.path.isfile(path) else None


class _BearerAuth:
    """httpx auth (a callable on the request) that sends the current WLCG token; read again per request,
    because tokens are renewed in place."""

    def __call__(self, request: Any) -> Any:
        token = bearer_token()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(<WLCG token from the environment>)"


def _ssl_context(proxy: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()  # system CAs, and SSL_CERT_FILE / SSL_CERT_DIR
    ca_dir = os.environ.get("X509_CERT_DIR") or (_GRID_CA_DIR if os.path.isdir(_GRID_CA_DIR) else None)
    if ca_dir:
        ctx.load_verify_locations(capath=ca_dir)
    if proxy:
        ctx.load_cert_chain(proxy)  # a proxy file holds the certificate, its key and the chain
    return ctx


def webdav_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus the grid credentials of the environment for a WebDAV lake.

    A bearer token becomes ``auth=`` unless ``auth`` is given; the CA directory (``X509_CERT_DIR``, else
    ``/etc/grid-security/certificates``) and the X.509 proxy go into ``verify=`` unless ``verify`` is given.
    """
    out = dict(options)
    if "auth" not in out and bearer_token():
        out["auth"] = _BearerAuth()
    if "verify" not in out:
        proxy = x509_proxy()
        if proxy or os.environ.get("X509_CERT_DIR") or os.path.isdir(_GRID_CA_DIR):
            out["verify"] = _ssl_context(proxy)
    return out
