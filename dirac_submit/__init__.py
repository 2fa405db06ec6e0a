"""dirac_submit: submit, watch, scale and kill DIRAC jobs over HTTPS, with no DIRAC installation.

Two transports behind one interface — DIRAC's Tornado HTTPS services (X.509 proxy) and DiracX
REST (bearer token) — a JDL builder that refuses what DIRAC's parser would mangle, and a job pool
that scales to a demand callback and kills its jobs on close, at exit and on Ctrl-C::

    from dirac_submit import JobPool, JobTemplate, TornadoTransport

    template = JobTemplate(["mqexec", "worker"], sites=["LCG.CERN.cern"], processors=2)
    with JobPool(TornadoTransport("https://dirac.example.org:8443"), template) as pool:
        pool.adapt(0, 20, demand=lambda: 5)
        ...

This package imports nothing from ``mqexec``.
"""

from .credentials import RabbitMQUserIssuer, SecretIssuer
from .diracx import DiracXTransport
from .errors import (
    AuthError,
    CAError,
    DiracError,
    HTTPStatusError,
    JDLError,
    NetworkError,
    ProxyError,
    ServiceError,
)
from .http import HTTPPolicy
from .jdl import JobTemplate
from .pool import Adaptive, Decision, JobInfo, JobPool
from .proxy import BearerToken, Proxy, end_entity, find_ca, is_proxy, load_diracx_token, load_proxy
from .tornado import ServicePaths, TornadoTransport
from .transport import FINAL_STATUSES, PENDING_STATUSES, JobState, KillResult, Transport

__all__ = [
    "FINAL_STATUSES",
    "PENDING_STATUSES",
    "Adaptive",
    "AuthError",
    "BearerToken",
    "CAError",
    "Decision",
    "DiracError",
    "DiracXTransport",
    "HTTPPolicy",
    "HTTPStatusError",
    "JDLError",
    "JobInfo",
    "JobPool",
    "JobState",
    "JobTemplate",
    "KillResult",
    "NetworkError",
    "Proxy",
    "ProxyError",
    "RabbitMQUserIssuer",
    "SecretIssuer",
    "ServiceError",
    "ServicePaths",
    "TornadoTransport",
    "Transport",
    "end_entity",
    "find_ca",
    "is_proxy",
    "load_diracx_token",
    "load_proxy",
]
