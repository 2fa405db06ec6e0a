"""The wire messages: a task envelope (client → worker) and a result envelope (worker → client).

Both are frozen dataclasses with explicit ``encode``/``decode`` and a version field; both are signed with
HMAC-SHA256 over their canonical JSON, and ``decode`` checks the signature *before* anything is unpickled.
Pickled payloads travel as base64 inside the JSON, so kombu/Celery only ever see JSON (they never unpickle).

    env = environment()
    task = TaskEnvelope(id="inc-1f2e", env=env, fn=FunctionRef.of(cloudpickle.dumps(f), inline_limit=2048),
                        calls=(Call(key="inc-1f2e", label="inc(41)", payload=dumps(((41,), {}))),),
                        reply_to="mqexec.results.abc")
    wire = task.encode(secret)            # dict, goes as the single Celery argument
    TaskEnvelope.decode(wire, secret)     # raises SignatureError if forged or tampered with
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from ._version import __version__
from .errors import SignatureError

VERSION = 1


def environment() -> dict[str, str]:
    """What a pickled payload depends on: Python major.minor, cloudpickle and mqexec versions."""
    import cloudpickle

    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "cloudpickle": cloudpickle.__version__,
        "mqexec": __version__,
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _sign(body: dict[str, Any], secret: bytes) -> dict[str, Any]:
    return {**body, "sig": hmac.new(secret, _canonical(body), hashlib.sha256).hexdigest()}


def _verified(wire: Any, secret: bytes, what: str) -> dict[str, Any]:
    if not isinstance(wire, dict) or not isinstance(wire.get("sig"), str):
        raise SignatureError(f"{what} is not a signed mqexec envelope")
    body = {k: v for k, v in wire.items() if k != "sig"}
    expected = hmac.new(secret, _canonical(body), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, wire["sig"]):
        raise SignatureError(
            f"{what} {body.get('id', '?')!r} has a bad signature: forged, tampered with, "
            "or signed with another key (check MQEXEC_SECRET on both sides)"
        )
    if body.get("v") != VERSION:
        raise SignatureError(f"{what} has envelope version {body.get('v')!r}; this mqexec speaks {VERSION}")
    return body


@dataclass(frozen=True)
class FunctionRef:
    """The function to call, by content hash; the pickled bytes ride along only when small."""

    hash: str
    size: int
    inline: bytes | None = None

    @classmethod
    def of(cls, pickled: bytes, inline_limit: int) -> FunctionRef:
        return cls(sha256(pickled), len(pickled), pickled if len(pickled) <= inline_limit else None)


@dataclass(frozen=True)
class Call:
    """One call of the function: its key (the future's), a readable label, pickled ``(args, kwargs)``."""

    key: str
    label: str
    payload: bytes
    retries: int = 0


@dataclass(frozen=True)
class TaskEnvelope:
    """One task message: a function and one or more calls of it (a batch), for one client's result queue."""

    id: str
    env: dict[str, str]
    fn: FunctionRef
    calls: tuple[Call, ...]
    reply_to: str
    lake: str | None = None
    v: int = VERSION

    def encode(self, secret: bytes) -> dict[str, Any]:
        body = {
            "v": self.v,
            "id": self.id,
            "env": self.env,
            "reply_to": self.reply_to,
            "lake": self.lake,
            "fn": {"hash": self.fn.hash, "size": self.fn.size, "inline": _b64(self.fn.inline)},
            "calls": [[c.key, c.label, _b64(c.payload), c.retries] for c in self.calls],
        }
        return _sign(body, secret)

    @classmethod
    def decode(cls, wire: Any, secret: bytes) -> TaskEnvelope:
        """Check the signature, then build the envelope (nothing is unpickled here)."""
        b = _verified(wire, secret, "task")
        try:
            fn = FunctionRef(b["fn"]["hash"], int(b["fn"]["size"]), _unb64(b["fn"]["inline"]))
            calls = tuple(Call(k, lbl, _unb64(p) or b"", int(r)) for k, lbl, p, r in b["calls"])
            return cls(b["id"], dict(b["env"]), fn, calls, b["reply_to"], b.get("lake"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureError(f"task {b.get('id', '?')!r} is signed but malformed: {exc!r}") from None

    def copy(self, **changes: Any) -> TaskEnvelope:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Outcome:
    """What became of one call: a pickled value (``ok``) or a pickled exception with its traceback text.

    ``ref`` replaces ``data`` when the value went to the data lake (``{"url", "size", "sha256"}``).
    ``error`` names a system failure that happened before the call could run (``"env"``, ``"unpickle"``,
    ``"fetch"``), so the client can raise the right mqexec error.
    """

    key: str
    ok: bool
    data: bytes | None = None
    ref: dict[str, Any] | None = None
    traceback: str = ""
    error: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class ResultEnvelope:
    """One result message: the outcomes of every call of one task message."""

    id: str
    worker: str
    outcomes: tuple[Outcome, ...]
    env: dict[str, str] = field(default_factory=dict)
    v: int = VERSION

    def encode(self, secret: bytes) -> bytes:
        body = {
            "v": self.v,
            "id": self.id,
            "worker": self.worker,
            "env": self.env,
            "outcomes": [[o.key, o.ok, _b64(o.data), o.ref, o.traceback, o.error, o.seconds] for o in self.outcomes],
        }
        return json.dumps(_sign(body, secret), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, secret: bytes) -> ResultEnvelope:
        try:
            wire = json.loads(raw)
        except ValueError:
            raise SignatureError("result message is not JSON: not from an mqexec worker") from None
        b = _verified(wire, secret, "result")
        try:
            outcomes = tuple(
                Outcome(k, bool(ok), _unb64(d), ref, tb, err, float(s)) for k, ok, d, ref, tb, err, s in b["outcomes"]
            )
            return cls(b["id"], b["worker"], outcomes, dict(b.get("env") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureError(f"result {b.get('id', '?')!r} is signed but malformed: {exc!r}") from None
