r"""Least-privilege RabbitMQ accounts: a broker user per analysis, allowed its own queue prefix and nothing else.

    mqexec broker grant --prefix ana --user ana --vhost analyses             # prints the rabbitmqctl commands
    mqexec broker grant --prefix ana --user ana --vhost analyses \
                        --management-url https://broker.example:15671        # applies them (management HTTP API)

What a queue prefix ``P`` touches on the broker — mqexec's topology (``topology.py``), Celery's remote control
(kombu's ``pidbox.py``: ``Mailbox.exchange_fmt``, ``reply_exchange_fmt``, ``get_queue``, ``get_reply_queue``)
and events (``app.py``: ``event_exchange``, ``event_queue_prefix``)::

    exchanges   P (tasks)   P.dlx (dead letters)   P.pidbox, reply.P.pidbox (remote control)   P.ev (events)
    queues      P.<env>[.<resource>]  P.results.<session>  P.blob.<sha256>[.<i>]  P.dead  P.ev.<id>  P.boot.<run>...
                <worker hostname>.P.pidbox  (a worker's mailbox)     <id>.reply.P.pidbox  (replies to a command)
    publishing  into those exchanges only: tasks, results, leases and blobs go through P, by queue name — never
                through the default exchange, which reaches every queue of the vhost by name

    configure = write = read = ^(P|P\..+|reply\.P\.pidbox|.+\.P\.pidbox)$

So another analysis's account cannot read this one's results or tasks, bind a queue to its exchanges, declare or
delete its queues, or publish into its exchanges or queues (ACCESS_REFUSED). A vhost per analysis (``--vhost``)
also keeps the names apart (``docs/security.md``).

    >>> permissions("ana")["write"]
    '^(ana|ana\\..+|reply\\.ana\\.pidbox|.+\\.ana\\.pidbox)$'
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import re
import secrets
import shlex
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import BrokerError, ConfigError

#: prefixes whose ``P.*`` would also cover other analyses' objects (``reply.<prefix>.pidbox``) or RabbitMQ's own
_RESERVED = ("reply", "amq")
_TIMEOUT = 10.0


def permissions(prefix: str) -> dict[str, str]:
    """The RabbitMQ permission regexes (``configure``, ``write``, ``read``) of an account for queue prefix ``prefix``.

    Raises:
        ConfigError: not a valid queue prefix, or one whose names would reach beyond its own objects.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", prefix):
        raise ConfigError(f"queue prefix must be 1-64 letters, digits, '-' or '_', got {prefix!r}")
    if prefix in _RESERVED:
        raise ConfigError(
            f"the queue prefix {prefix!r} cannot have an account of its own: {prefix}.* also names other analyses' "
            "reply exchanges (reply.<prefix>.pidbox) or RabbitMQ's amq.* objects — choose another prefix"
        )
    p = re.escape(prefix)
    own = f"{p}|{p}\\..+|reply\\.{p}\\.pidbox|.+\\.{p}\\.pidbox"
    return {"configure": f"^({own})$", "write": f"^({own})$", "read": f"^({own})$"}


def rabbitmqctl_commands(prefix: str, user: str, vhost: str = "/") -> list[str]:
    """The ``rabbitmqctl`` lines that make ``user`` an account for ``prefix`` on ``vhost`` (the first two may
    answer that the vhost or user exists already; ``add_user`` asks for the password)."""
    perms = permissions(prefix)
    lines = [] if vhost == "/" else [["rabbitmqctl", "add_vhost", vhost]]
    lines += [
        ["rabbitmqctl", "add_user", user],
        ["rabbitmqctl", "set_permissions", "-p", vhost, user, perms["configure"], perms["write"], perms["read"]],
    ]
    return [shlex.join(line) for line in lines]


class ManagementAPI:
    """The few calls of RabbitMQ's management HTTP API that make an account (as an administrator).

    >>> api = ManagementAPI("https://broker.example:15671", ("admin", password))     # doctest: +SKIP
    >>> api.grant("ana", "ana", "analyses")                                            # doctest: +SKIP
    'a-generated-password'
    """

    def __init__(self, url: str, admin: tuple[str, str], *, verify: str | bool = True) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"the management URL must be http(s)://host:port, got {url!r}")
        self.url, self.admin = url.rstrip("/"), admin
        context = None
        if parts.scheme == "https":
            import ssl

            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        self._auth = "Basic " + base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
        handlers = [urllib.request.HTTPSHandler(context=context)] if context is not None else []
        self._open = urllib.request.build_opener(*handlers).open

    def grant(self, prefix: str, user: str, vhost: str = "/", password: str | None = None) -> str | None:
        """Make ``vhost`` and ``user`` if they do not exist and set the user's permissions on ``vhost`` to
        :func:`permissions` of ``prefix``. Returns the password of a user made now (``password``, or a generated
        one), None if the user existed (its password is left alone).

        Raises:
            BrokerError: the API cannot be reached, or refused (naming what and why, never a password).
        """
        perms = permissions(prefix)
        v = quote(vhost, safe="")
        self._call("PUT", f"/api/vhosts/{v}", {})
        made = None
        if self._call("GET", f"/api/users/{quote(user, safe='')}", None, missing_ok=True) is None:
            made = password or secrets.token_urlsafe(24)
            self._call("PUT", f"/api/users/{quote(user, safe='')}", {"password": made, "tags": ""})
        self._call("PUT", f"/api/permissions/{v}/{quote(user, safe='')}", perms)
        return made

    def _call(self, verb: str, path: str, body: Any, *, missing_ok: bool = False) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=verb)
        request.add_header("content-type", "application/json")
        request.add_header("authorization", self._auth)
        try:
            with self._open(request, timeout=_TIMEOUT) as response:
                text = response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            if exc.code == 401:
                raise BrokerError(
                    f"the RabbitMQ management API at {self.url} refused the admin user {self.admin[0]!r}: wrong user "
                    "name or password"
                ) from None
            raise BrokerError(
                f"the RabbitMQ management API at {self.url} answered {exc.code} {exc.reason} to {verb} {path} (an "
                "account needs the 'administrator' tag to make users)"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BrokerError(f"cannot reach the RabbitMQ management API at {self.url}: {reason}") from None
        return json.loads(text) if text else {}


def register_cli(subparsers: Any) -> None:
    """Add ``mqexec broker grant`` to an ``argparse`` sub-parser set (sets ``run=``)."""
    broker = subparsers.add_parser("broker", help="broker accounts: least privilege per analysis")
    sub = broker.add_subparsers(dest="broker_command", required=True)
    g = sub.add_parser(
        "grant",
        help="make USER an account for queue prefix PREFIX only (prints rabbitmqctl commands, or applies them)",
        description="RabbitMQ permissions covering only PREFIX's queues and exchanges (docs/security.md).",
    )
    g.add_argument("--prefix", required=True, help="the analysis's queue prefix (MQEXEC_QUEUE_PREFIX)")
    g.add_argument("--user", required=True, help="the broker user of that analysis")
    g.add_argument("--vhost", default="/", help="virtual host (default /); one per analysis isolates it fully")
    g.add_argument("--management-url", help="apply through RabbitMQ's management API, e.g. https://broker:15671")
    g.add_argument(
        "--management-user",
        default="admin",
        help="an administrator; its password from $MQEXEC_RABBITMQ_ADMIN_PASSWORD or a prompt",
    )
    g.add_argument("--ca", help="CA bundle for an https management URL (default: the system's)")
    g.set_defaults(run=_grant)


def _grant(args: argparse.Namespace) -> int:
    if not args.management_url:
        print("\n".join(rabbitmqctl_commands(args.prefix, args.user, args.vhost)))
        return 0
    permissions(args.prefix)  # a bad prefix is said before a password is asked for
    password = os.environ.get("MQEXEC_RABBITMQ_ADMIN_PASSWORD") or getpass.getpass(
        f"RabbitMQ management password for {args.management_user}: "
    )
    api = ManagementAPI(args.management_url, (args.management_user, password), verify=args.ca or True)
    made = api.grant(args.prefix, args.user, args.vhost)
    perms = permissions(args.prefix)
    print(f"user {args.user!r} on vhost {args.vhost!r}: " + ", ".join(f"{k} {v}" for k, v in perms.items()))
    if made is not None:
        print(f"made user {args.user!r}; its password (shown once): {made}")
    return 0
