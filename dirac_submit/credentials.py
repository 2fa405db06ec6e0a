"""Getting credentials to the payload without putting real secrets in the JDL.

A JDL is readable by the job's owner, the VO's admins and every DIRAC service on the way, and
it is kept after the job ends. So a pool never writes a long-lived secret there. Instead a
:class:`SecretIssuer` mints credentials for *this run only*, with the least privilege the payload
needs; the pool puts those into the jobs' ``ExecutionEnvironment`` and calls :meth:`revoke` on
close (also at exit and on Ctrl-C). What a reader of the JDL can learn is a credential that is
already dead, or one that only lets a worker consume one queue while the run lasts.

:class:`RabbitMQUserIssuer` does this for a broker: a throw-away user created through RabbitMQ's
management HTTP API, with permissions limited by regular expressions, deleted (and its connections
closed) on revoke::

    issuer = RabbitMQUserIssuer(
        "http://127.0.0.1:15672", admin=("admin", admin_password),
        amqp_url="amqps://broker.example.org:5671/{vhost}", vhost="analysis",
        configure="^$", write="^results\\\\.", read="^tasks\\\\.",
        env_name="MQEXEC_BROKER_URL",
    )
    pool = JobPool(transport, template, secrets=issuer)
"""

from __future__ import annotations

import secrets as _random
import time
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import quote

from .errors import AuthError, DiracError
from .http import HTTPPolicy


class SecretIssuer(Protocol):
    """Mints run-scoped credentials for jobs and withdraws them afterwards."""

    def issue(self) -> Mapping[str, str]:
        """Create the credentials; return environment values for the payload."""
        ...

    def revoke(self) -> None:
        """Withdraw everything :meth:`issue` created (idempotent)."""
        ...


class RabbitMQUserIssuer:
    """A short-lived, least-privilege RabbitMQ user per run.

    Args:
        management_url: base URL of the RabbitMQ management API (``http(s)://host:15672``).
        admin: ``(user, password)`` allowed to manage users (``administrator`` tag) — stays on this machine.
        amqp_url: broker URL for the payload with a ``{vhost}`` placeholder, e.g. ``amqps://host:5671/{vhost}``;
            the issued user and password are inserted.
        vhost: virtual host the user gets permissions on.
        configure, write, read: RabbitMQ permission regexes (default: nothing).
        env_name: environment variable the payload reads the URL from.
        prefix: user name prefix; names are ``<prefix>-<unix time>-<random>`` so leftovers can be found.
        verify: CA bundle/dir for an https management URL, or ``True``.
    """

    def __init__(
        self,
        management_url: str,
        *,
        admin: tuple[str, str],
        amqp_url: str,
        vhost: str = "/",
        configure: str = "^$",
        write: str = "^$",
        read: str = "^$",
        env_name: str = "BROKER_URL",
        prefix: str = "dirac-submit",
        verify: str | bool = True,
        http: HTTPPolicy | None = None,
    ) -> None:
        self.management_url = management_url.rstrip("/")
        self.admin = admin
        self.amqp_url = amqp_url
        self.vhost = vhost
        self.permissions = {"configure": configure, "write": write, "read": read}
        self.env_name = env_name
        self.prefix = prefix
        self.verify = verify
        self.http = http or HTTPPolicy(timeout=10, retries=2)
        self.user: str | None = None

    def _request(self, verb: str, path: str, **kwargs: object) -> None:
        with self.http.session() as session:
            try:
                self.http.send(
                    session,
                    f"RabbitMQ {verb} {path}",
                    verb,
                    self.management_url + path,
                    idempotent=True,
                    auth=self.admin,
                    verify=self.verify,
                    **kwargs,
                )
            except AuthError as err:
                if err.status is None:  # a TLS handshake problem, already worded
                    raise
                raise AuthError(
                    f"the RabbitMQ management API at {self.management_url} refused the admin user "
                    f"{self.admin[0]!r} ({verb} {path}): wrong user name or password, or the user lacks the "
                    "'administrator' tag"
                ) from None

    def issue(self) -> Mapping[str, str]:
        """Create the user and its permissions; return ``{env_name: amqp URL with its credentials}``."""
        if self.user is not None:
            raise DiracError(f"{self.user} was already issued; revoke() it before issuing again")
        user = f"{self.prefix}-{int(time.time())}-{_random.token_hex(4)}"
        password = _random.token_urlsafe(24)
        vhost = quote(self.vhost, safe="")
        self._request("PUT", f"/api/users/{user}", json={"password": password, "tags": ""})
        self.user = user
        self._request("PUT", f"/api/permissions/{vhost}/{user}", json=self.permissions)
        scheme, rest = self.amqp_url.split("://", 1)
        url = f"{scheme}://{user}:{quote(password, safe='')}@{rest.format(vhost=vhost)}"
        return {self.env_name: url}

    def revoke(self) -> None:
        """Delete the user and close its connections (running payloads lose the broker)."""
        if self.user is None:
            return
        user, self.user = self.user, None
        self._request("DELETE", f"/api/users/{user}")
        self._request("DELETE", f"/api/connections/username/{user}")
