"""Who may run code, and who may answer: the analyst's signing identity and what workers are given.

Threat model (the full table is in ``docs/security.md``): workers run on grid nodes the analyst does not control,
and the broker vhost may be shared. So the trust is asymmetric::

    analyst's machine                                          every worker (grid node, embedded process)
    Identity  = Ed25519 private key + result secret   ──token──▶  Trust = Ed25519 *public* key + result secret
      signs task messages (only the analyst can)                    verifies task messages (cannot mint them)
      verifies results with result_key(session)     ◀──results──    signs results with result_key(session)

- A compromised worker holds no private key: it cannot sign a task, so it cannot make any other worker (or the
  analyst's client) run code. What it can do — return wrong values for the tasks it was given — is inherent to
  running work there; the client still never unpickles its errors, and unpickles values restrictedly on request.
- Result keys are derived per client session (HMAC of the result secret and the session id), so results signed
  for one session are refused by every other.
- Another analysis on the vhost holds another identity: its workers refuse our tasks (a different key id) and
  our client refuses its results.

The identity lives in ``~/.config/mqexec/key`` (created 0600 in a 0700 directory, whatever the umask; a key file
that group or others can read is refused, as ssh does). ``mqexec key worker`` prints the worker token for
``MQEXEC_SECRET``. The embedded default and every DIRAC run use a fresh identity of their own.

    >>> me = Identity.new()
    >>> sig = me.sign(b"task")
    >>> me.trust.verify(b"task", sig), me.trust.verify(b"tampered", sig)
    (True, False)
    >>> Trust.parse(me.trust.token()).key_id == me.trust.key_id
    True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_IDENTITY = "mqxk1"  #: text form of an identity: mqxk1.<seed>.<result secret> (urlsafe base64)
_TOKEN = "mqxw1"  #: text form of a worker's trust: mqxw1.<public key>.<result secret>


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse(text: str, prefix: str, what: str) -> tuple[bytes, bytes]:
    parts = text.strip().split(".")
    try:
        if len(parts) != 3 or parts[0] != prefix:
            raise ValueError
        first, second = _unb64(parts[1]), _unb64(parts[2])
        if len(first) != 32 or len(second) != 32:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"this is not an mqexec {what} (expected '{prefix}.<key>.<secret>'; "
            "a worker's MQEXEC_SECRET comes from `mqexec key worker` on the analyst's machine)"
        ) from None
    return first, second


@dataclass(frozen=True)
class Trust:
    """What a worker holds: the analyst's public key (to verify tasks) and the result secret (to sign results)."""

    public_key: bytes
    result_secret: bytes = field(repr=False)

    @classmethod
    def parse(cls, token: str) -> Trust:
        """The trust in a worker token (``mqxw1....``); :class:`ConfigError` if it is not one."""
        return cls(*_parse(token, _TOKEN, "worker key"))

    def token(self) -> str:
        """The text a worker is given (``MQEXEC_SECRET``); it cannot sign tasks."""
        return f"{_TOKEN}.{_b64(self.public_key)}.{_b64(self.result_secret)}"

    @property
    def key_id(self) -> str:
        """A short fingerprint of the public key, named in errors and carried by every task."""
        return hashlib.sha256(self.public_key).hexdigest()[:16]

    def verify(self, data: bytes, signature: bytes) -> bool:
        """True if ``signature`` is the identity's Ed25519 signature of ``data``."""
        from cryptography.exceptions import InvalidSignature

        try:
            self._verifier.verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def result_key(self, session: str) -> bytes:
        """The HMAC key results of client session ``session`` are signed with."""
        return hmac.new(self.result_secret, b"mqexec-results:" + session.encode(), hashlib.sha256).digest()

    @property
    def _verifier(self) -> Any:
        cached = self.__dict__.get("_verifier_obj")
        if cached is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            cached = Ed25519PublicKey.from_public_bytes(self.public_key)
            object.__setattr__(self, "_verifier_obj", cached)
        return cached


@dataclass(frozen=True)
class Identity:
    """What only the analyst holds: the Ed25519 key that signs tasks, and the result secret."""

    seed: bytes = field(repr=False)
    result_secret: bytes = field(repr=False)

    @classmethod
    def new(cls) -> Identity:
        """A fresh identity (for a key file, the embedded default, or one DIRAC run)."""
        return cls(secrets.token_bytes(32), secrets.token_bytes(32))

    @classmethod
    def parse(cls, text: str) -> Identity:
        """The identity in its text form (``mqxk1....``)."""
        return cls(*_parse(text, _IDENTITY, "signing identity"))

    def text(self) -> str:
        """The secret text form of this identity (what the key file holds)."""
        return f"{_IDENTITY}.{_b64(self.seed)}.{_b64(self.result_secret)}"

    @property
    def trust(self) -> Trust:
        """What workers are given: the public half and the result secret."""
        cached = self.__dict__.get("_trust")
        if cached is None:
            from cryptography.hazmat.primitives import serialization

            public = self._signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            cached = Trust(public, self.result_secret)
            object.__setattr__(self, "_trust", cached)
        return cached

    def sign(self, data: bytes) -> bytes:
        """The Ed25519 signature of ``data``."""
        return bytes(self._signer.sign(data))

    @property
    def _signer(self) -> Any:
        cached = self.__dict__.get("_signer_obj")
        if cached is None:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

            cached = Ed25519PrivateKey.from_private_bytes(self.seed)
            object.__setattr__(self, "_signer_obj", cached)
        return cached


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/mqexec/key`` (default ``~/.config/mqexec/key``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mqexec" / "key"


def read_private(path: str | os.PathLike[str], what: str) -> str:
    """The text of a secret file, refused (as ssh does) when group or others may read it.

    Raises:
        ConfigError: missing, unreadable, empty, or readable by group/others (naming the ``chmod`` that fixes it).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"the {what} {path} can be read by other users (mode {stat.S_IMODE(mode):04o}); "
                f"it must be private: run `chmod 600 {path}`"
            )
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"the {what} {path} is empty")
    return text


def load_identity(path: str | os.PathLike[str] | None = None, *, create: bool = True) -> Identity:
    """The analyst's identity from its key file, made (0600 in a 0700 directory) the first time.

    >>> me = load_identity("/tmp/somewhere/key")          # doctest: +SKIP
    """
    path = Path(path) if path else default_key_file()
    if not path.exists() and create:
        _make_private_dir(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by a concurrent process: read theirs
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(Identity.new().text() + "\n")
            os.chmod(path, 0o600)
    return Identity.parse(read_private(path, "signing key file"))


def _make_private_dir(directory: Path) -> None:
    """Create ``directory`` (and missing parents) with mode 0700, whatever the umask."""
    missing = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)
