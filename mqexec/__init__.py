"""mqexec: run coffea and dask work on workers that can only connect out, through a message broker.

import mqexec
with mqexec.Client() as client:                      # embedded default; or Client("amqps://...")
    print(client.submit(lambda x: x + 1, 41).result())

from mqexec import MQExecutor                        # coffea: Runner(executor=MQExecutor())
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .client import Client
from .config import Config
from .errors import (
    BrokerError,
    ConfigError,
    EnvironmentMismatch,
    MQExecError,
    NoWorkerError,
    RemoteError,
    SerializationError,
    SignatureError,
    TaskDeadLettered,
    UnsafeResultError,
)
from .futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Future,
    as_completed,
    fire_and_forget,
    futures_of,
    wait,
)
from .safepickle import allow

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "BrokerError",
    "Client",
    "Config",
    "ConfigError",
    "DiracWorkers",
    "EnvironmentMismatch",
    "Future",
    "MQExecError",
    "MQExecutor",
    "NoWorkerError",
    "RemoteError",
    "SerializationError",
    "SignatureError",
    "TaskDeadLettered",
    "UnsafeResultError",
    "__version__",
    "allow",
    "as_completed",
    "fire_and_forget",
    "futures_of",
    "wait",
]

_LAZY = {"MQExecutor": "mqexec.adapters.coffea", "DiracWorkers": "mqexec.dirac"}


def __getattr__(name: str) -> Any:
    """Heavy adapters load on first use, so ``mqexec worker`` never imports coffea or requests."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mqexec' has no attribute {name!r}")
