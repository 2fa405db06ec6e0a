"""Which DIRAC jobs are yours, and what stopping their workers needs: the state file of ``mqexec jobs``.

``$XDG_STATE_HOME/mqexec/dirac-jobs.json`` (default ``~/.local/state/mqexec/``) holds one record per run::

    {"runs": {"<run>": {"url": ..., "transport": "tornado", "proxy": ..., "ca_dir": ..., "setup": ...,
                        "created": ..., "jobs": [ids], "mqexec": {"broker_url": ..., "secret": ..., ...}}}}

The ``mqexec`` part is the run's config (:func:`config_record`): ``mqexec jobs kill`` needs it to tell the killed
jobs' workers to stop, as the owner. It may hold the broker URL with its password and the signing key, so the
file is written mode 0600 in a directory of mode 0700, whatever the umask, and changed only under a lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import MQExecError

if TYPE_CHECKING:
    from dirac_submit import Transport

_CONFIG_FIELDS = ("broker_url", "identity", "queue_prefix", "env")  #: what `jobs kill` needs to reach and sign


def state_path() -> Path:
    """``$XDG_STATE_HOME/mqexec/dirac-jobs.json`` (default ``~/.local/state/mqexec/dirac-jobs.json``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mqexec" / "dirac-jobs.json"


def read_state(path: Path) -> dict[str, Any]:
    """The state file's content (``{"runs": {}}`` when there is none yet)."""
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return {"runs": {}}
    except (OSError, ValueError) as exc:
        raise MQExecError(f"cannot read the job list {path}: {exc}") from None


def update_state(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and write the state file under a lock (several runs may submit at once)."""
    import fcntl

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # also when it existed, or the umask took bits off at creation
    with open(_private(path.with_suffix(".lock")), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(path)
        change(state)
        tmp = _private(path.with_suffix(".tmp"))
        with open(tmp, "w") as out:
            json.dump(state, out, indent=1)
        tmp.replace(path)


def _private(path: Path) -> Path:
    """Create ``path`` if needed; mode 0600 either way."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)
    return path


def config_record(cfg: Config) -> dict[str, str]:
    """The part of a run's config that its workers are told apart and addressed by (kept in the state file)."""
    return {name: getattr(cfg, name) for name in _CONFIG_FIELDS}


def config_of(record: dict[str, Any]) -> Config | None:
    """The run's config back from its record (None for runs recorded before mqexec kept it)."""
    values = record.get("mqexec")
    return Config.load(**values) if values else None


def runs(path: Path) -> Iterator[tuple[str, dict[str, Any], Transport]]:
    """``(run, record, transport)`` for every recorded run, oldest first."""
    from .workers import make_transport

    for run, rec in sorted(read_state(path).get("runs", {}).items()):
        proxy = rec.get("proxy") if rec.get("proxy") and os.path.exists(rec["proxy"]) else None
        transport = make_transport(
            rec["url"], rec.get("transport", "tornado"), proxy=proxy, ca_dir=rec.get("ca_dir"), setup=rec.get("setup")
        )
        yield run, rec, transport
