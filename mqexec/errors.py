"""The one error family mqexec raises of its own.

Remote exceptions are *not* wrapped: a task that raised ``KeyError`` re-raises ``KeyError`` in the client, with
the remote traceback's frames on it (see :mod:`mqexec.remote`). What is listed here are the failures of the
system itself — a broker that cannot be reached, no worker for the client's environment, a task that could not
be run — each with a message that names the cause.
"""

from __future__ import annotations


class MQExecError(Exception):
    """Base class of every error mqexec raises of its own."""


class ConfigError(MQExecError, ValueError):
    """A setting is missing or malformed (unknown broker scheme, unreadable key file, ...)."""


class BrokerError(MQExecError, ConnectionError):
    """The broker cannot be reached, refused the login, or refused a message."""


class NoWorkerError(MQExecError):
    """No connected worker consumes the queue of the client's environment."""


class TaskDeadLettered(MQExecError):
    """A task could not be run: it was started ``delivery_limit`` times and its worker died every time (a crash,
    out of memory, ``os._exit`` in the task), or the broker gave up on its message."""


class SignatureError(MQExecError):
    """A message was not signed with a trusted key, or was changed after signing."""


class EnvironmentMismatch(MQExecError):
    """A worker's interpreter cannot run what the client pickled (e.g. Python 3.12 client, 3.11 worker)."""


class SerializationError(MQExecError, TypeError):
    """A function, argument or result cannot be pickled (or unpickled where it has to run)."""


class UnsafeResultError(SerializationError):
    """A result holds a class that the client's restricted unpickler does not allow (see ``mqexec.allow``)."""


class RemoteError(MQExecError):
    """A remote exception whose own type cannot be rebuilt here; carries its type name and message.

    Attributes:
        remote_type: ``module.QualifiedName`` of the exception raised on the worker.
    """

    def __init__(self, message: str, remote_type: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
