"""The wire format: task messages (client → worker) and frames (worker → client), and how values travel.

    client ── Task (JSON, Ed25519-signed by the analyst) ──▶ task queue ──▶ worker
    worker ── Frame (binary, HMAC-signed with the session's result key) ──▶ the client's results queue
              "lease"  {held: [message ids], released: [...], lost: [[id, why], ...]}
              "piece"  one slice of a value too big for one message (results without a data lake)
              "result" the outcomes of every call of one task message

A task message carries one function and one or more calls of it (a batch). Everything pickled travels as a
:class:`Ref` — inline bytes, a blob shipped once by content hash (``blobs.py``), or a data-lake object — and is
unpickled on the worker only after the signature, the key id, the queue prefix, the expiry and the nonce
checked out (``intake.py``). Kombu and Celery only ever see JSON.

A :class:`~mqexec.futures.Future` anywhere inside the arguments — in a list, a namedtuple, a custom object, a dask
task — pickles to a placeholder (:func:`dependency`) naming its key; the client sends the value alongside
(``Call.deps``) and the worker's unpickler puts it in the placeholder's place.

    >>> from mqexec.keys import Identity
    >>> me = Identity.new()
    >>> call = Call(key="inc-1", label="inc(1)", args=Ref.inline(b"..."))
    >>> task = Task(id="m1", prefix="mqexec", session="s1", key_id=me.trust.key_id, nonce="n1", expires=2e9,
    ...             python="3.11", reply_to="mqexec.results.s1", fn=Ref.inline(b"fn"), calls=(call,))
    >>> Task.verify(task.sign(me), me.trust).calls[0].key
    'inc-1'

One piece because: it is the whole message format — what a client sends, what a worker answers and how
values travel between them — and both sides must agree on every field of it.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import SignatureError

if TYPE_CHECKING:
    from .keys import Identity, Trust

VERSION = 2
Key = Any  #: a future's key: a string, or a tuple of strings and numbers (dask keys)
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


class ForeignKey(SignatureError):
    """A task signed by another identity than the one this worker trusts (a wrongly configured worker)."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def key_to_json(key: Key) -> Any:
    """Tuple keys travel as JSON lists."""
    return [key_to_json(k) for k in key] if isinstance(key, tuple) else key


def key_from_json(value: Any) -> Key:
    return tuple(key_from_json(v) for v in value) if isinstance(value, list) else value


def _shown(value: Any) -> str:
    """``repr(value)``, cut to 60 characters: what an unverified message says goes into log lines only so long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- values ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """How pickled bytes reach a worker: ``inline`` data, a ``blob`` (sha256, size, pieces) or a ``lake`` object."""

    data: bytes | None = None
    blob: str | None = None
    size: int = 0
    pieces: int = 0  #: 0: one blob message; n: n piece queues
    lake: dict[str, Any] | None = None

    @classmethod
    def inline(cls, data: bytes) -> Ref:
        return cls(data=data, size=len(data))

    def to_json(self) -> dict[str, Any]:
        if self.data is not None:
            return {"i": _b64(self.data)}
        if self.blob is not None:
            return {"b": self.blob, "n": self.size, "p": self.pieces}
        return {"l": self.lake}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Ref:
        if "i" in d:
            return cls.inline(_unb64(d["i"]))
        if "b" in d:
            return cls(blob=str(d["b"]), size=int(d["n"]), pieces=int(d["p"]))
        return cls(lake=dict(d["l"]), size=int(d["l"]["size"]))


# -- placeholders for futures ----------------------------------------------------------------------------------

_SEEN: contextvars.ContextVar[set[Key] | None] = contextvars.ContextVar("mqexec_seen", default=None)
_VALUES: contextvars.ContextVar[Callable[[Key], Any] | None] = contextvars.ContextVar("mqexec_values", default=None)


def dependency(key: Key) -> Any:
    """What a pickled Future becomes on the worker: the value of ``key`` (handed in with the call)."""
    values = _VALUES.get()
    if values is None:
        raise RuntimeError(
            f"the future {key!r} was unpickled outside an mqexec task: futures stand for values only "
            "inside the arguments of submit/map"
        )
    return values(key)


def noticed(key: Key) -> None:
    """Called by ``Future.__reduce__``: record ``key`` as a dependency of what is being pickled."""
    seen = _SEEN.get()
    if seen is not None:
        seen.add(key)


@contextlib.contextmanager
def collecting() -> Iterator[set[Key]]:
    """Inside the block, the keys of the futures that get pickled are collected into the yielded set."""
    seen: set[Key] = set()
    token = _SEEN.set(seen)
    try:
        yield seen
    finally:
        _SEEN.reset(token)


@contextlib.contextmanager
def resolving(values: Callable[[Key], Any]) -> Iterator[None]:
    """Inside the block, unpickled futures become ``values(key)``."""
    token = _VALUES.set(values)
    try:
        yield
    finally:
        _VALUES.reset(token)


# -- client → worker ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One call: its key (the future's), a readable label, pickled ``(args, kwargs)``, the values of the futures
    inside them, and how many times to retry if it raises."""

    key: Key
    label: str
    args: Ref
    deps: tuple[tuple[Key, Ref], ...] = ()
    retries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "k": key_to_json(self.key),
            "l": self.label,
            "a": self.args.to_json(),
            "d": [[key_to_json(k), r.to_json()] for k, r in self.deps],
            "r": self.retries,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Call:
        deps = tuple((key_from_json(k), Ref.from_json(r)) for k, r in d["d"])
        return cls(key_from_json(d["k"]), str(d["l"]), Ref.from_json(d["a"]), deps, int(d["r"]))


@dataclass(frozen=True)
class Task:
    """One task message: a function and its calls, bound to one prefix, session and expiry, signed by the analyst.

    ``nonce`` makes every published copy unique (a republished task gets a new one): a worker refuses a nonce it
    has seen (replay). ``attempt`` counts how often the client has sent these calls.
    """

    id: str
    prefix: str
    session: str
    key_id: str
    nonce: str
    expires: float
    python: str
    reply_to: str
    fn: Ref
    calls: tuple[Call, ...]
    code: Ref | None = None
    lake: str | None = None
    attempt: int = 1
    v: int = VERSION

    def _body(self) -> dict[str, Any]:
        return {
            "v": self.v,
            "id": self.id,
            "prefix": self.prefix,
            "session": self.session,
            "kid": self.key_id,
            "nonce": self.nonce,
            "exp": self.expires,
            "py": self.python,
            "reply": self.reply_to,
            "fn": self.fn.to_json(),
            "code": self.code.to_json() if self.code else None,
            "lake": self.lake,
            "try": self.attempt,
            "calls": [c.to_json() for c in self.calls],
        }

    def sign(self, identity: Identity) -> dict[str, Any]:
        """The wire form (a JSON-able dict, the single argument of the Celery message)."""
        body = self._body()
        return {**body, "sig": _b64(identity.sign(_canonical(body)))}

    @classmethod
    def verify(cls, wire: Any, trust: Trust) -> Task:
        """Check the key id and the signature, then build the task (nothing is unpickled here).

        Raises:
            ForeignKey: signed by another identity than ``trust``'s.
            SignatureError: not an mqexec task, forged, tampered with, or of another envelope version.
        """
        if not isinstance(wire, dict) or not isinstance(wire.get("sig"), str):
            raise SignatureError("the message is not a signed mqexec task")
        if wire.get("kid") != trust.key_id:
            raise ForeignKey(
                f"task {_shown(wire.get('id', '?'))} was signed by key {_shown(wire.get('kid'))}, but this worker "
                f"trusts key {trust.key_id!r}"
            )
        body = {k: v for k, v in wire.items() if k != "sig"}
        try:
            signature = _unb64(wire["sig"])
        except ValueError:
            signature = b""
        if not trust.verify(_canonical(body), signature):
            raise SignatureError(f"task {_shown(body.get('id', '?'))} has a bad signature: forged or tampered with")
        return cls.checked(body)

    @classmethod
    def checked(cls, body: dict[str, Any]) -> Task:
        """A task from the body of a message whose signature was verified already (by the worker's gate, in the
        process that hands it to its pool process)."""
        if body.get("v") != VERSION:
            raise SignatureError(f"task has envelope version {body.get('v')!r}; this mqexec speaks {VERSION}")
        try:
            return cls(
                id=str(body["id"]),
                prefix=str(body["prefix"]),
                session=str(body["session"]),
                key_id=str(body["kid"]),
                nonce=str(body["nonce"]),
                expires=float(body["exp"]),
                python=str(body["py"]),
                reply_to=str(body["reply"]),
                fn=Ref.from_json(body["fn"]),
                calls=tuple(Call.from_json(c) for c in body["calls"]),
                code=Ref.from_json(body["code"]) if body.get("code") else None,
                lake=body.get("lake"),
                attempt=int(body["try"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SignatureError(f"task {body.get('id', '?')!r} is signed but malformed: {exc!r}") from None

    def copy(self, **changes: Any) -> Task:
        return replace(self, **changes)


# -- worker → client ---------------------------------------------------------------------------------------------

_MAGIC = b"MQXF"
_HEAD = struct.Struct(">4sI")


@dataclass(frozen=True)
class Frame:
    """A signed message from a worker: a JSON ``head`` and binary ``parts`` (values, pieces), no base64.

    ``kind`` is ``"result"``, ``"lease"`` or ``"piece"``; ``msg`` the task message it is about.
    """

    kind: str
    session: str
    worker: str
    head: dict[str, Any] = field(default_factory=dict)
    parts: tuple[bytes, ...] = ()

    def encode(self, key: bytes) -> bytes:
        head = {
            "v": VERSION,
            "kind": self.kind,
            "session": self.session,
            "worker": self.worker,
            "sizes": [len(p) for p in self.parts],
            **self.head,
        }
        raw = _canonical(head)
        mac = hmac.new(key, raw, hashlib.sha256)
        for part in self.parts:
            mac.update(part)
        signed = _canonical({**head, "sig": mac.hexdigest()})
        return b"".join([_HEAD.pack(_MAGIC, len(signed)), signed, *self.parts])

    @staticmethod
    def session_of(raw: bytes) -> str:
        """The session a frame claims to be for (to pick its key); nothing is trusted yet."""
        head = Frame._head(raw)[0]
        return str(head.get("session", ""))

    @staticmethod
    def _head(raw: bytes) -> tuple[dict[str, Any], int]:
        try:
            magic, n = _HEAD.unpack_from(raw)
            if magic != _MAGIC:
                raise ValueError
            head = json.loads(raw[_HEAD.size : _HEAD.size + n])
            if not isinstance(head, dict):
                raise ValueError
        except (struct.error, ValueError):
            raise SignatureError("the message is not an mqexec frame") from None
        return head, _HEAD.size + n

    @classmethod
    def decode(cls, raw: bytes, key: bytes) -> Frame:
        """Check the HMAC with the session's result key, then split the parts (nothing is unpickled)."""
        head, offset = cls._head(raw)
        sig = head.pop("sig", "")
        mac = hmac.new(key, _canonical(head), hashlib.sha256)
        sizes = head.get("sizes")
        if not isinstance(sizes, list) or sum(sizes) != len(raw) - offset:
            raise SignatureError("a frame's parts do not match its header: truncated or tampered with")
        parts = []
        for size in sizes:
            part = raw[offset : offset + size]
            mac.update(part)
            parts.append(part)
            offset += size
        if not hmac.compare_digest(mac.hexdigest(), str(sig)):
            raise SignatureError(
                f"a {str(head.get('kind', '?'))[:20]} frame from {_shown(head.get('worker', '?'))} has a bad "
                "signature: not from a worker of this session"
            )
        if head.get("v") != VERSION:
            raise SignatureError(f"frame version {head.get('v')!r}; this mqexec speaks {VERSION}")
        fixed = ("v", "kind", "session", "worker", "sizes")
        rest = {k: v for k, v in head.items() if k not in fixed}
        return cls(str(head["kind"]), str(head["session"]), str(head["worker"]), rest, tuple(parts))


@dataclass(frozen=True)
class Outcome:
    """What became of one call (inside a ``result`` frame).

    ``ok``: the pickled value is ``value`` (inline), or in the data lake (``lake``), or arrived in ``pieces``
    piece frames (``size`` bytes, ``sha`` sha256). Not ``ok``: ``error`` describes the exception
    (``mqexec.remote``); ``system`` names a failure before the call could run (``"env"``, ``"code"``, ``"fetch"``).
    """

    key: Key
    ok: bool
    type_name: str = ""
    value: bytes | None = None
    lake: dict[str, Any] | None = None
    pieces: int = 0
    size: int = 0
    sha: str = ""
    error: dict[str, Any] | None = None
    system: str = ""
    seconds: float = 0.0  #: how long the call took on the worker


def result_frame(session: str, worker: str, msg: str, outcomes: list[Outcome], site: str = "") -> Frame:
    """The ``result`` frame of one task message (``site``: the worker's grid site, when it runs in a job)."""
    parts: list[bytes] = []
    rows = []
    for o in outcomes:
        row: dict[str, Any] = {"k": key_to_json(o.key), "ok": o.ok, "s": round(o.seconds, 6)}
        if o.ok:
            row["t"] = o.type_name
            if o.value is not None:
                row["part"] = len(parts)
                parts.append(o.value)
            elif o.lake is not None:
                row["lake"] = o.lake
            else:
                row.update(pieces=o.pieces, size=o.size, sha=o.sha)
        else:
            row.update(err=o.error, sys=o.system)
        rows.append(row)
    return Frame("result", session, worker, {"msg": msg, "site": site, "outcomes": rows}, tuple(parts))


def outcomes_of(frame: Frame) -> list[Outcome]:
    """The outcomes in a ``result`` frame."""
    out = []
    for row in frame.head.get("outcomes", []):
        key, seconds = key_from_json(row["k"]), float(row.get("s") or 0.0)
        if not row["ok"]:
            out.append(Outcome(key, False, error=row.get("err") or {}, system=row.get("sys") or "", seconds=seconds))
            continue
        type_name = str(row.get("t", ""))
        if "part" in row:
            value: dict[str, Any] = {"value": frame.parts[int(row["part"])]}
        elif "lake" in row:
            value = {"lake": dict(row["lake"])}
        else:
            value = {"pieces": int(row["pieces"]), "size": int(row["size"]), "sha": str(row["sha"])}
        out.append(Outcome(key, True, type_name, seconds=seconds, **value))
    return out
