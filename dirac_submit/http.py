"""The HTTP policy both transports share: timeouts, bounded retries with backoff, TLS errors.

``requests`` honours ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` over ``Session.verify`` when
``trust_env`` is on; the sessions made here turn it off, so the CA the user named is the one used::

    policy = HTTPPolicy(timeout=10, retries=2)
    session = policy.session()
    response = policy.send(session, "JobManager.ping", "POST", url, idempotent=True,
                           verify="/etc/grid-security/certificates", cert="/tmp/x509up_u1000",
                           data={"method": "ping", "args": "[]"})
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

from .errors import AuthError, CAError, HTTPStatusError, NetworkError

_TRANSIENT_STATUS = frozenset({502, 503, 504})
#: What OpenSSL says when the other end answers a TLS hello with something that is not TLS (plain HTTP).
_NOT_TLS = (
    "WRONG_VERSION_NUMBER",
    "wrong version number",
    "RECORD_LAYER_FAILURE",
    "record layer failure",
    "http request",
    "packet length too long",
    "UNKNOWN_PROTOCOL",
    "unknown protocol",
)


@dataclass(frozen=True)
class HTTPPolicy:
    """How patient to be with a server.

    Args:
        timeout: seconds for connecting and for each read.
        retries: extra attempts after a network failure or a 502/503/504 (bounded).
        backoff: first pause between attempts in seconds; doubles each time up to ``max_backoff``.
        max_backoff: longest pause between attempts.
    """

    timeout: float = 30.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 16.0

    def session(self) -> requests.Session:
        """A session that ignores ``REQUESTS_CA_BUNDLE`` and proxy variables of the environment."""
        session = requests.Session()
        session.trust_env = False
        return session

    def send(
        self, session: requests.Session, call: str, verb: str, url: str, *, idempotent: bool, **kwargs: Any
    ) -> requests.Response:
        """Send one request with retries; return the response of a status < 400.

        A request that may have reached the server (read timeout) is retried only when
        ``idempotent``: resubmitting a job after a lost answer would create a second job.

        Raises:
            AuthError: HTTP 401/403.
            HTTPStatusError: any other status >= 400 (after retries for 502/503/504).
            CAError: the server certificate does not verify against the configured CAs.
            NetworkError: no answer after ``retries + 1`` attempts.
        """
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            try:
                response = session.request(verb, url, timeout=self.timeout, **kwargs)
            except requests.exceptions.SSLError as err:
                raise _tls_error(url, kwargs.get("verify"), err) from err
            except requests.exceptions.ConnectTimeout:
                last = f"connecting timed out after {self.timeout:g} s"
                continue
            except requests.exceptions.ReadTimeout as err:
                if not idempotent:
                    raise NetworkError(
                        f"{call}: no answer from {url} within {self.timeout:g} s; not retried because the "
                        "request may have been executed (check with a status query before resubmitting)"
                    ) from err
                last = f"no answer within {self.timeout:g} s"
                continue
            except requests.exceptions.ConnectionError as err:
                if not idempotent and not _never_sent(err):
                    raise NetworkError(
                        f"{call}: the connection to {url} broke after the request was sent ({_reason(err)}); not "
                        "retried because it may have been executed (check with a status query before resubmitting)"
                    ) from err
                last = f"connection failed: {_reason(err)}"
                continue
            if response.status_code in _TRANSIENT_STATUS:
                last = f"HTTP {response.status_code} {response.reason}"
                continue
            if response.status_code >= 400:
                raise _status_error(call, url, response)
            return response
        raise NetworkError(
            f"{call}: {url} did not answer after {self.retries + 1} attempts (last: {last}); "
            "check the URL, your network, or raise HTTPPolicy(timeout=..., retries=...)"
        )


def _never_sent(err: requests.exceptions.ConnectionError) -> bool:
    """True when the connection could not even be opened, so the server cannot have acted."""
    reason = getattr(err.args[0], "reason", None) if err.args else None
    return isinstance(reason, urllib3.exceptions.NewConnectionError)


def _reason(err: Exception) -> str:
    """The innermost cause of a ``requests`` error, e.g. ``[Errno 111] Connection refused`` (one line)."""
    cause: BaseException = err
    seen = {id(err)}
    while True:
        reason = getattr(cause, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else cause.__cause__ or cause.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        cause = nxt
    text = str(cause) or type(cause).__name__
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>: ", "", text)
    return " ".join(text.split())


def _tls_error(url: str, verify: object, err: Exception) -> Exception:
    text = _reason(err)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return CAError(
            f"the certificate of {url} could not be verified with the CAs in {verify!r} ({text}); "
            "point X509_CERT_DIR (or ca_dir=) to your grid CA directory"
        )
    if any(mark in text for mark in _NOT_TLS):
        host = urlsplit(url)
        return NetworkError(
            f"{host.hostname}:{host.port or 443} does not speak TLS ({text}): is it a plain-HTTP port? "
            "Give the HTTPS port of the service (DIRAC's Tornado services listen on 8443 by default)"
        )
    if "alert" in text.lower():  # the server sent a TLS alert: it did not accept our certificate
        return AuthError(f"the TLS handshake with {url} was refused ({text}): is your proxy accepted by the server?")
    return NetworkError(f"the TLS handshake with {url} failed: {text}")


def _status_error(call: str, url: str, response: requests.Response) -> Exception:
    body = _text(response.text)[:300]
    code = response.status_code
    if code in (401, 403):
        return AuthError(
            f"{call}: HTTP {code} {response.reason} from {url}: the server did not accept your credentials "
            f"(expired, not registered in this DIRAC, or wrong group). Server said: {body or '(nothing)'}",
            status=code,
        )
    if code == 501:
        text = f"{call}: HTTP 501: the service at {url} does not implement this method (wrong service path?)"
    elif code == 400:
        text = f"{call}: HTTP 400 Bad Request from {url}: {body or 'the request was malformed'}"
    elif code == 404:
        text = f"{call}: HTTP 404: nothing at {url} (check the service path or URL)"
    else:
        text = f"{call}: HTTP {code} {response.reason} from {url}: {body}"
    return HTTPStatusError(call, code, text)


def _text(body: str) -> str:
    """A reply body as one line of text: HTML tags dropped, blanks collapsed."""
    return " ".join(re.sub(r"<title>.*?</title>|<[^>]+>", " ", body, flags=re.DOTALL | re.IGNORECASE).split())
