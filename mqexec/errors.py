"""The one error family mqexec raises of its own.

Remote exceptions are *not* wrapped: a task that raised ``KeyError`` re-raises ``KeyError`` in the client,
with the remote traceback attached as ``__cause__`` (a :class:`RemoteTraceback`). What is listed here are the
failures of the system itself — a broker that cannot be reached, no worker for the client's environment, a
task that the broker dead-lettered — each with a message that names the cause.
"""

from __future__ import annotations


class MQExecError(Exception):
    """Base class of every error mqexec raises of its own."""


class ConfigError(MQExecError, ValueError):
    """A setting is missing or malformed (unknown broker scheme, unreadable key file, ...)."""


class BrokerError(MQExecError, ConnectionError):
    """The broker cannot be reached, or refused the login."""


class NoWorkerError(MQExecError):
    """No connected worker consumes the queue of the client's environment."""


class TaskDeadLettered(MQExecError):
    """The broker gave up on a task: its delivery limit was reached (it killed its worker every time) or a
    worker rejected it (bad signature, malformed envelope)."""


class SignatureError(MQExecError):
    """A message was not signed with a trusted key, or was changed after signing."""


class EnvironmentMismatch(MQExecError):
    """A worker's interpreter cannot run what the client pickled (e.g. Python 3.12 client, 3.11 worker)."""


class SerializationError(MQExecError, TypeError):
    """A function, argument or result cannot be pickled (or unpickled where it has to run)."""


class RemoteError(MQExecError):
    """A remote exception whose own type could not be sent back; carries its type name and message."""


class RemoteTraceback(Exception):
    """Carries the formatted remote traceback; set as ``__cause__`` of a re-raised remote exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
