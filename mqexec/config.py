"""Settings, from arguments > environment (``MQEXEC_*``) > defaults, in one object validated once.

The same object reaches every process whole: a process mqexec starts (an embedded worker) gets it as JSON in
``MQEXEC_CONFIG`` (:meth:`Config.for_worker`), so a setting given to the client — ``queue_prefix="ana"`` — is the
worker's too. The analyst's signing identity never travels: workers get the verifying half (``secret``).

>>> cfg = Config.load(broker_url="amqp://guest:guest@127.0.0.1:5672//", concurrency=4)
>>> cfg.queue_prefix, cfg.transport.quorum
('mqexec', True)
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .broker import Transport
    from .keys import Identity, Trust

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|min|sec|seconds?|minutes?|hours?|days?)?\s*$")
_UNITS = {
    "ms": 0.001,
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": 86400,
    "day": 86400,
    "days": 86400,
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
CONFIG_ENV = "MQEXEC_CONFIG"  #: the whole config as JSON, for the processes mqexec starts


def parse_duration(value: str | float | None) -> float | None:
    """Seconds from ``90``, ``"90s"``, ``"500 ms"``, ``"10m"``, ``"47h"`` or ``"2d"``; ``None`` stays ``None``.

    >>> parse_duration("47h"), parse_duration("500 ms")
    (169200.0, 0.5)
    """
    if value is None or isinstance(value, int | float):
        return None if value is None else float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"cannot read duration {value!r}: use a number of seconds or e.g. 500ms, 90s, 10m, 47h, 2d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_resources(value: str | dict[str, float] | None) -> dict[str, float]:
    """``"GPU=1,MEM=16"`` → ``{"GPU": 1.0, "MEM": 16.0}``."""
    if not value:
        return {}
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    out: dict[str, float] = {}
    for part in value.split(","):
        name, sep, amount = part.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name.strip()):
            raise ConfigError(f"cannot read resource {part!r}: use NAME=AMOUNT, e.g. GPU=1")
        try:
            out[name.strip()] = float(amount)
        except ValueError:
            raise ConfigError(f"cannot read resource {part!r}: {amount!r} is not a number") from None
    return out


def default_env() -> str:
    """The queue key of this interpreter: ``py3.11`` — tasks pickled here only run on a worker with the same."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}"


def _default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mqexec")


_DURATIONS = (
    "idle_timeout",
    "max_walltime",
    "drain_margin",
    "connect_timeout",
    "heartbeat",
    "lease_interval",
    "lease_timeout",
    "session_grace",
    "session_expire",
    "publish_timeout",
    "task_ttl",
    "no_worker_grace",
)
_INTEGERS = (
    "concurrency",
    "delivery_limit",
    "inline_limit",
    "arg_inline_limit",
    "result_inline_limit",
    "piece_size",
    "local_workers",
)
_BOOLEANS = ("ship_code", "safe_results", "replicated_results")
_SECRETS = ("identity", "secret")  #: never printed, never in a message
_LOCAL = ("cache_dir", "key_file")  #: paths of this machine


@dataclass(frozen=True)
class Config:
    """Every setting mqexec reads. Build with :meth:`load`; fields map to ``MQEXEC_<FIELD>`` variables.

    >>> Config.load(idle_timeout="10m").idle_timeout
    600.0
    """

    broker_url: str | None = None  #: None → the embedded default; ``a;b;c`` lists failover brokers
    identity: str = field(default="", repr=False)  #: the client's signing identity (default: ``key_file``)
    key_file: str = ""  #: where the client's identity lives (default ``~/.config/mqexec/key``)
    secret: str = field(default="", repr=False)  #: a worker's trust token (``mqexec key worker``)
    env: str = field(default_factory=default_env)  #: queue key of the interpreter
    queue_prefix: str = "mqexec"
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    resources: dict[str, float] = field(default_factory=dict)
    local_workers: int = 1  #: worker processes of the embedded default
    idle_timeout: float | None = None  #: worker exits cleanly after this long without a task
    max_walltime: float | None = None  #: worker's batch-system limit; it drains before reaching it
    drain_margin: float | None = None  #: stop taking tasks this long before max_walltime (default 10%, ≤15 min)
    delivery_limit: int = 4  #: a task whose worker died this many times fails with TaskDeadLettered
    inline_limit: int = 2048  #: functions larger than this are shipped once per worker by hash
    arg_inline_limit: int = 64 * 1024  #: arguments / dependency values larger than this are shipped once as blobs
    connect_timeout: float = 5.0
    #: AMQP heartbeat of clients and workers: a silent peer is found in ~2 intervals — well inside lease_timeout,
    #: so a worker behind a half-open connection reconnects and renews its leases before its tasks are sent again
    heartbeat: float = 15.0
    lease_interval: float = 10.0  #: how often a worker says which tasks it holds
    lease_timeout: float = 60.0  #: a task whose worker has not said so for this long is sent again
    session_grace: float = 15.0  #: a client gone this long is over: workers skip its queued tasks
    session_expire: float = 600.0  #: ... and the broker deletes its queues this long after it went
    publish_timeout: float = 30.0  #: how long a task waits for an unreachable broker before its future fails
    task_ttl: float = 7 * 86400.0  #: a task message older than this is refused (bounds replay memory)
    no_worker_grace: float = 5.0  #: how long a client waits before saying no worker serves its env
    lake_url: str | None = None  #: data lake for big results (file://, root://, davs://)
    cache_url: str | None = None  #: lake(s) of memoized calls (``cache=True``): ``URL[,URL...]``, the first written
    result_inline_limit: int = 1 << 20  #: results above this go to the lake, when one is configured
    piece_size: int = 8 << 20  #: without a lake, results above this travel in pieces of this size
    cache_dir: str = field(default_factory=_default_cache_dir)
    tls_ca: str | None = None  #: CA file for amqps:// (default: the system's)
    tls_cert: str | None = None  #: client certificate: logs in with RabbitMQ's EXTERNAL mechanism
    tls_key: str | None = None
    replicated_results: bool | None = None  #: results queues as quorum queues (default: when a failover list is given)
    ship_code: bool = True  #: send the analysis's own modules (outside site-packages) to the workers
    safe_results: bool = False  #: unpickle results with the allow-list (MQExecutor outputs always are)

    def __repr__(self) -> str:
        """All settings but the secrets, the broker URL without its password."""
        from .broker import redact

        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _SECRETS}
        shown["broker_url"] = redact(self.broker_url) if self.broker_url else None
        return f"Config({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def load(cls, **given: Any) -> Config:
        """Settings from keyword arguments, then ``MQEXEC_*`` variables, then defaults; validated once.

        A process started by mqexec finds its whole config in ``MQEXEC_CONFIG`` and reads nothing else from
        the environment (keyword arguments still win).
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
        whole = os.environ.get(CONFIG_ENV)
        if whole:
            try:
                values.update(json.loads(whole))
            except ValueError:
                raise ConfigError(f"${CONFIG_ENV} is not the JSON of an mqexec config") from None
        else:
            for name in names:
                env = os.environ.get(f"MQEXEC_{name.upper()}")
                if env not in (None, ""):
                    values[name] = env
            if "secret" not in values and os.environ.get("MQEXEC_SECRET_FILE"):
                from .keys import read_private

                values["secret"] = read_private(os.environ["MQEXEC_SECRET_FILE"], "worker key file")
        values.update({k: v for k, v in given.items() if v is not None})
        return cls._validated(values)

    @classmethod
    def _validated(cls, v: dict[str, Any]) -> Config:
        for name in _DURATIONS:
            if name in v:
                v[name] = parse_duration(v[name])
        for name in _INTEGERS:
            if name in v and not isinstance(v[name], int):
                try:
                    v[name] = int(v[name])
                except ValueError:
                    raise ConfigError(f"{name} must be a whole number, got {v[name]!r}") from None
        for name in _BOOLEANS:
            if name in v and isinstance(v[name], str):
                if v[name].lower() not in _TRUE | _FALSE:
                    raise ConfigError(f"{name} must be true or false, got {v[name]!r}")
                v[name] = v[name].lower() in _TRUE
        if "resources" in v:
            v["resources"] = parse_resources(v["resources"])
        for name in _SECRETS:
            if isinstance(v.get(name), bytes):
                v[name] = v[name].decode()
        cfg = cls(**v)
        for name in ("concurrency", "delivery_limit", "local_workers"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cfg.queue_prefix):
            raise ConfigError(f"queue_prefix must be 1-64 letters, digits, '-' or '_', got {cfg.queue_prefix!r}")
        if cfg.lease_timeout < 2 * cfg.lease_interval:
            raise ConfigError(
                f"lease_timeout ({cfg.lease_timeout:g} s) must be at least twice lease_interval "
                f"({cfg.lease_interval:g} s)"
            )
        if cfg.broker_url is not None:
            cfg.transport  # noqa: B018 - validates the URL(s) now, with a sentence naming what is wrong
        return cfg

    def replace(self, **changes: Any) -> Config:
        """A copy with some settings changed (validated like :meth:`load`)."""
        return self._validated({**dataclasses.asdict(self), **changes})

    @cached_property
    def transport(self) -> Transport:
        """What the broker URL's transport can do (quorum queues, confirms, heartbeats ...), computed once."""
        from .broker import transport_of

        return transport_of(self.broker_url or "")

    @property
    def results_replicated(self) -> bool:
        """Whether results queues are replicated (quorum): asked for, or by default when the broker URL lists several
        nodes of a cluster. On one node a classic queue answers sooner, and a result lost with it is sent again
        (its task's lease runs out)."""
        if self.replicated_results is not None:
            return self.replicated_results
        return self.transport.quorum and ";" in (self.broker_url or "")

    def drain_at(self) -> float | None:
        """Seconds after start at which a worker stops taking tasks, or None without a walltime."""
        if self.max_walltime is None:
            return None
        margin = self.drain_margin
        if margin is None:
            margin = min(0.1 * self.max_walltime, 900.0)
        return max(self.max_walltime - margin, 0.0)

    def signer(self) -> Identity:
        """The client's signing identity: the configured one, or the user's key file (made the first time)."""
        from .keys import Identity, load_identity

        if self.identity:
            return Identity.parse(self.identity)
        return load_identity(self.key_file or None)

    def trust(self) -> Trust:
        """A worker's trust: ``secret`` (a worker token), else the verifying half of the configured identity.

        Raises:
            ConfigError: neither is set — the worker would trust no task.
        """
        from .keys import Identity, Trust

        if self.secret:
            return Trust.parse(self.secret)
        if self.identity:
            return Identity.parse(self.identity).trust
        raise ConfigError(
            "this worker has no key, so it would trust no task: set MQEXEC_SECRET (or MQEXEC_SECRET_FILE) to "
            "the output of `mqexec key worker` on the analyst's machine"
        )

    def for_worker(self, **changes: Any) -> Config:
        """The config a worker process is given: the identity's verifying half instead of the identity."""
        secret = self.trust().token() if (self.identity or self.secret) else self.signer().trust.token()
        return self.replace(identity="", key_file="", secret=secret, **changes)

    def to_env(self, *, portable: bool = False) -> dict[str, str]:
        """``{"MQEXEC_CONFIG": <this config as JSON>}``, for a process mqexec starts (see :meth:`load`);
        ``portable``: without what belongs to this machine (its cache folder, key file), for another one."""
        values = dataclasses.asdict(self)
        if portable:
            for name in _LOCAL:
                values.pop(name)
        return {CONFIG_ENV: json.dumps(values)}
