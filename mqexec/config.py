"""Settings, from arguments > environment (``MQEXEC_*``) > defaults, in one object validated once.

>>> cfg = Config.load(broker_url="amqp://guest:guest@127.0.0.1:5672//", concurrency=4)
>>> cfg.queue_prefix
'mqexec'
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str | float | None) -> float | None:
    """Seconds from ``90``, ``"90s"``, ``"10m"``, ``"47h"`` or ``"2d"``; ``None`` stays ``None``.

    >>> parse_duration("47h")
    169200.0
    """
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.match(value)
    if not m:
        raise ConfigError(f"cannot read duration {value!r}: use a number of seconds or e.g. 90s, 10m, 47h, 2d")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_resources(value: str | dict[str, float] | None) -> dict[str, float]:
    """``"GPU=1,MEM=16"`` → ``{"GPU": 1.0, "MEM": 16.0}``."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    out: dict[str, float] = {}
    for part in value.split(","):
        name, sep, amount = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"cannot read resource {part!r}: use NAME=AMOUNT, e.g. GPU=1")
        out[name.strip()] = float(amount)
    return out


def default_env() -> str:
    """The queue key of this interpreter: ``py3.11`` — tasks pickled here only run on a worker with the same."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


def _secret_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "mqexec" / "secret"


@dataclass(frozen=True)
class Config:
    """Every setting mqexec reads. Build with :meth:`load`; fields map to ``MQEXEC_<FIELD>`` variables."""

    broker_url: str | None = None  #: None → the embedded default (local broker + local workers)
    secret: bytes = b""  #: HMAC key that signs tasks and results
    env: str = field(default_factory=default_env)  #: queue key of the interpreter
    queue_prefix: str = "mqexec"
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    resources: dict[str, float] = field(default_factory=dict)
    idle_timeout: float | None = None  #: worker exits cleanly after this long without a task
    max_walltime: float | None = None  #: worker's batch-system limit; it drains before reaching it
    drain_margin: float | None = None  #: stop taking tasks this long before max_walltime (default 10%, ≤15 min)
    delivery_limit: int = 4  #: a task redelivered more often than this is dead-lettered
    inline_limit: int = 2048  #: functions larger than this are shipped once per worker by hash
    connect_timeout: float = 5.0
    heartbeat: float = 30.0  #: AMQP heartbeat of workers (keeps NAT mappings alive)
    results_expire: float = 3600.0  #: an abandoned client's result queue is deleted after this long
    no_worker_grace: float = 5.0  #: how long a client waits before saying no worker serves its env
    lake_url: str | None = None  #: data lake for big results (file://, root://, davs://)
    result_inline_limit: int = 1 << 20  #: results above this go to the lake, when one is configured
    cache_dir: str = field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "mqexec"))

    @classmethod
    def load(cls, **given: Any) -> Config:
        """Settings from keyword arguments, then ``MQEXEC_*`` variables, then defaults; validated once.

        >>> Config.load(idle_timeout="10m").idle_timeout
        600.0
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(given) - names
        if unknown:
            import difflib

            bad = sorted(unknown)[0]
            near = difflib.get_close_matches(bad, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown mqexec setting {bad!r}{hint}")
        values: dict[str, Any] = {}
        for name in names:
            if given.get(name) is not None:
                values[name] = given[name]
            elif (env := os.environ.get(f"MQEXEC_{name.upper()}")) not in (None, ""):
                values[name] = env
        if "secret" not in values:
            values["secret"] = _read_secret_file(os.environ.get("MQEXEC_SECRET_FILE"))
        return cls._validated(values)

    @classmethod
    def _validated(cls, v: dict[str, Any]) -> Config:
        for name in (
            "idle_timeout",
            "max_walltime",
            "drain_margin",
            "connect_timeout",
            "heartbeat",
            "results_expire",
            "no_worker_grace",
        ):
            if name in v:
                v[name] = parse_duration(v[name])
        for name in ("concurrency", "delivery_limit", "inline_limit", "result_inline_limit"):
            if name in v:
                try:
                    v[name] = int(v[name])
                except ValueError:
                    raise ConfigError(f"{name} must be a whole number, got {v[name]!r}") from None
        if "resources" in v:
            v["resources"] = parse_resources(v["resources"])
        if isinstance(v.get("secret"), str):
            v["secret"] = v["secret"].encode()
        cfg = cls(**v)
        if cfg.concurrency < 1:
            raise ConfigError(f"concurrency must be ≥ 1, got {cfg.concurrency}")
        if cfg.delivery_limit < 1:
            raise ConfigError(f"delivery_limit must be ≥ 1, got {cfg.delivery_limit}")
        return cfg

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed (validated like :meth:`load`)."""
        return self._validated({**dataclasses.asdict(self), **changes})

    def drain_at(self) -> float | None:
        """Seconds after start at which a worker stops taking tasks, or None without a walltime."""
        if self.max_walltime is None:
            return None
        margin = self.drain_margin
        if margin is None:
            margin = min(0.1 * self.max_walltime, 900.0)
        return max(self.max_walltime - margin, 0.0)

    def with_secret(self) -> Config:
        """This config, with a signing key: the configured one, or the user's key file (created, mode 0600,
        the first time) — so a client and a worker started by the same user agree without set-up."""
        if self.secret:
            return self
        path = _secret_path()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
        return dataclasses.replace(self, secret=_read_secret_file(str(path)))


def _read_secret_file(path: str | None) -> bytes:
    if not path:
        default = _secret_path()
        if not default.exists():
            return b""
        path = str(default)
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the signing key file {path}: {exc.strerror}") from None
    if not data:
        raise ConfigError(f"the signing key file {path} is empty")
    return data
