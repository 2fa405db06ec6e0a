"""Remote control that only the analyst can steer: signed commands, checked by every worker.

    owner (client, `mqexec flower`, `mqexec jobs kill`) ── Celery broadcast on exchange P.pidbox ──▶ workers
        arguments["_mqexec"] = {prefix, key id, time, nonce, Ed25519 signature of the command}
    worker: Pidbox.on_message ── signed by the identity it trusts, for its prefix, < 2 min old, nonce unseen?
        yes → Celery's handler runs;  no → only read-only inspection (Flower's views) is answered

Threat answered (``docs/security.md``): anyone who can publish to the vhost — another analysis, or a compromised
worker holding the broker account — could otherwise shut workers down, revoke tasks of other projects or resize
pools with a plain Celery ``broadcast``. Commands that change anything must carry the analyst's signature; the
exchange is per prefix, so other apps' broadcasts never reach mqexec workers at all.

    >>> stop_workers(cfg, dirac_jobs=[123, 124])          # doctest: +SKIP
    ['mqexec-py3.11-123@wn042.example.org']
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery.app.control import Control
from celery.worker import pidbox
from celery.worker.consumer.control import Control as ControlStep
from celery.worker.control import control_command

if TYPE_CHECKING:
    from .config import Config
    from .keys import Identity, Trust

log = logging.getLogger("mqexec.worker")

SIGNED = "_mqexec"
MAX_AGE = 120.0  #: a signed command older than this (or from this far in the future) is refused
#: inspection that changes nothing: answered unsigned, so Flower's pages work for whoever may read the vhost.
#: Not ``hello``: it is mingle's sync and adds the ``revoked`` ids it is given (mqexec workers run without mingle).
READ_ONLY = frozenset(
    {
        "ping",
        "stats",
        "active",
        "reserved",
        "scheduled",
        "revoked",
        "registered",
        "active_queues",
        "conf",
        "query_task",
        "report",
        "clock",
        "heartbeat",
    }
)


def _canonical(method: str, arguments: dict[str, Any], destination: Any, stamp: dict[str, Any]) -> bytes:
    body = {"method": method, "arguments": arguments, "destination": destination, **stamp}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(identity: Identity, prefix: str, method: str, arguments: dict[str, Any], destination: Any) -> dict[str, Any]:
    """``arguments`` with the owner's signature added (under ``"_mqexec"``)."""
    stamp = {"prefix": prefix, "kid": identity.trust.key_id, "ts": time.time(), "nonce": secrets.token_hex(12)}
    signature = identity.sign(_canonical(method, arguments, destination, stamp))
    return {**arguments, SIGNED: {**stamp, "sig": base64.b64encode(signature).decode()}}


class OwnerControl(Control):  # type: ignore[misc]
    """Celery's ``app.control`` that signs every broadcast with the app's owner identity (when it has one)."""

    def broadcast(
        self, command: str, arguments: dict[str, Any] | None = None, destination: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        owner = getattr(self.app, "mqexec_owner", None)
        arguments = dict(arguments or {})
        if owner is not None:
            arguments = sign(owner, self.app.mqexec_config.queue_prefix, command, arguments, destination)
        return super().broadcast(command, arguments, destination, *args, **kwargs)


class Verifier:
    """A worker's check of control commands; remembers nonces for :data:`MAX_AGE` seconds."""

    def __init__(self, trust: Trust, prefix: str) -> None:
        self.trust, self.prefix = trust, prefix
        self._seen: dict[str, float] = {}
        self._refused: set[str] = set()

    def allows(self, body: dict[str, Any]) -> tuple[bool, str]:
        """(whether to obey, why not); strips the signature from ``body["arguments"]``."""
        method = str(body.get("method", ""))
        arguments = body.get("arguments") or {}
        stamp = arguments.pop(SIGNED, None) if isinstance(arguments, dict) else None
        if stamp is None:
            return method in READ_ONLY, "unsigned"
        try:
            sig = base64.b64decode(stamp.pop("sig"))
            stamp_ok = stamp["prefix"] == self.prefix and stamp["kid"] == self.trust.key_id
            fresh = abs(time.time() - float(stamp["ts"])) < MAX_AGE
            nonce = str(stamp["nonce"])
        except (KeyError, TypeError, ValueError, AttributeError):
            return False, "malformed signature"
        if not stamp_ok:
            return False, "signed by another identity or for another prefix"
        if not fresh:
            return False, "too old (or the clocks disagree by over 2 minutes)"
        if not self.trust.verify(_canonical(method, arguments, body.get("destination"), stamp), sig):
            return False, "bad signature"
        now = time.monotonic()
        self._seen = {n: t for n, t in self._seen.items() if now - t < 2 * MAX_AGE}
        if nonce in self._seen:
            return False, "replayed"
        self._seen[nonce] = now
        return True, ""

    def refused(self, method: str, why: str) -> None:
        if (method, why) not in self._refused:  # logged once per kind, never obeyed
            self._refused.add((method, why))  # type: ignore[arg-type]
            log.warning(
                "refused remote-control command %r: %s (only the analyst's signed commands are obeyed)", method, why
            )


class Pidbox(pidbox.Pidbox):  # type: ignore[misc]
    """Celery's worker mailbox, obeying only what :class:`Verifier` allows."""

    def __init__(self, c: Any) -> None:
        super().__init__(c)
        cfg = c.app.mqexec_config
        self.verifier = Verifier(cfg.trust(), cfg.queue_prefix)

    def on_message(self, body: Any, message: Any) -> None:
        if not isinstance(body, dict):
            return
        ok, why = self.verifier.allows(body)
        if not ok:
            self.verifier.refused(str(body.get("method")), why)
            return
        super().on_message(body, message)


class ControlStep_(ControlStep):  # type: ignore[misc]
    """The consumer's remote-control step, with :class:`Pidbox`."""

    requires = ("mqexec.intake:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.box = Pidbox(c)
        self.start, self.stop, self.shutdown = self.box.start, self.box.stop, self.box.shutdown


@control_command(args=[("jobs", list), ("hostnames", list)])  # type: ignore[untyped-decorator]
def mqexec_stop(state: Any, jobs: Sequence[int] = (), hostnames: Sequence[str] = (), **_: Any) -> dict[str, str]:
    """Stop taking tasks now and exit after the running ones — if this worker's DIRAC job or name is listed."""
    from .intake import current_gate, dirac_job_id

    job = dirac_job_id()
    if state.hostname not in hostnames and (job is None or job not in {str(j) for j in jobs}):
        return {"ok": "not me"}
    gate = current_gate()
    if gate is not None:
        gate.stop_taking("the owner asked (mqexec jobs kill / DiracWorkers.close)")
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()  # after this reply has gone out
    return {"ok": "stopping"}


def stop_workers(
    cfg: Config, *, dirac_jobs: Sequence[int] = (), hostnames: Sequence[str] = (), timeout: float = 5.0
) -> list[str]:
    """Tell the workers of ``cfg``'s prefix that run as these DIRAC jobs (or have these names) to stop taking tasks
    at once and exit after their running ones; signed with the analyst's identity. Returns the names of the
    workers that confirmed (they take no task after confirming)."""
    from .app import make_app

    app = make_app(cfg, owner=cfg.signer())
    replies = app.control.broadcast(
        "mqexec_stop",
        arguments={"jobs": [str(j) for j in dirac_jobs], "hostnames": list(hostnames)},
        reply=True,
        timeout=timeout,
    )
    return sorted(name for reply in replies or [] for name, r in reply.items() if r.get("ok") == "stopping")
