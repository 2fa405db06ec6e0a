"""One error family for everything dirac_submit can tell the user.

Every message says what failed, where, and what to do about it::

    try:
        transport.submit([jdl])
    except DiracError as err:
        print(err)   # e.g. "JobManager.submitJob failed: Number of parametric jobs exceeds ..."
"""

from __future__ import annotations

from typing import Any


class DiracError(Exception):
    """Base class of all errors raised by dirac_submit."""


class ProxyError(DiracError):
    """The X.509 proxy (or DiracX token) is missing, unreadable or expired."""


class CAError(DiracError):
    """The CA certificates needed to verify the server are missing or do not verify it."""


class JDLError(DiracError, ValueError):
    """A job description value cannot be represented in DIRAC's JDL."""


class AuthError(DiracError):
    """The server refused our credentials: HTTP 401/403 (``status``), or a TLS alert (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class HTTPStatusError(DiracError):
    """The server answered with an HTTP error status other than 401/403.

    Attributes:
        status: the HTTP status code.
        call: ``"<Service>.<method>"`` or ``"<VERB> <path>"`` of the failed request.
    """

    def __init__(self, call: str, status: int, message: str) -> None:
        super().__init__(message)
        self.call = call
        self.status = status


class ServiceError(DiracError):
    """The service answered ``{"OK": false, ...}``; ``message`` is DIRAC's text, verbatim.

    Attributes:
        call: ``"JobManager.killJob"`` etc.
        errno: DIRAC's ``Errno`` (0 when the server sent none).
        message: DIRAC's ``Message``, unchanged.
        reply: the whole decoded reply (e.g. ``NonauthorizedJobIDs``, ``FailedJobIDs``).
    """

    def __init__(self, call: str, errno: int, message: str, reply: dict[str, Any]) -> None:
        super().__init__(f"{call} failed: {message}" + (f" (Errno {errno})" if errno else ""))
        self.call = call
        self.errno = errno
        self.message = message
        self.reply = reply


class NetworkError(DiracError):
    """The server could not be reached, did not answer in time after all retries, or does not speak TLS there."""
