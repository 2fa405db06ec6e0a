"""The analysis's own modules travel with its tasks: a source archive, shipped once by content hash.

    client: modules imported from outside the Python installation and not installed as a distribution
            (AGC's ``utils/`` next to the notebook, a ``processor.py`` beside the script)
            ──zip of their .py files (deterministic; sha256)──▶ blob, named in every task (``Task.code``)
    worker: fetch once ──▶ <cache_dir>/code/<sha256>/ ──▶ front of sys.path (modules of an older archive of
            the same names are unloaded first) ──▶ functions and classes unpickle by reference, as at home

Tracebacks point back at the analyst's own files: frames under the archive's folder are renamed to the client's
paths (the archive's manifest). ``ship_code=False`` (``MQEXEC_SHIP_CODE=0``) turns it off, e.g. when the worker
image already has the analysis installed.

    >>> shipped = archive()                        # doctest: +SKIP
    >>> shipped.names, len(shipped.data)           # doctest: +SKIP
    (['utils'], 14237)
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import os
import shutil
import site
import sys
import sysconfig
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .wire import sha256

_MANIFEST = "__mqexec_manifest__.json"
_MAX_FILE = 4 << 20
_MAX_TOTAL = 64 << 20
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Archive:
    data: bytes
    digest: str
    names: list[str]  #: top-level module / package names inside


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(sorted({os.path.realpath(p) + os.sep for p in paths if p}))


_verdicts: dict[tuple[str, str], Path | None] = {}  #: (top-level name, its __file__) → its path if local
_installed: set[str] = set()  #: top-level names of installed distributions, as last read
_lock = threading.Lock()


def _outside(module: ModuleType) -> Path | None:
    """The path of a module from outside the Python installation (else None)."""
    path = _origin(module)
    if path is None or str(path).startswith(os.sep + "proc") or str(path).startswith(_installed_roots()):
        return None
    return path


def local_modules() -> dict[str, Path]:
    """Top-level modules of the analysis itself: name → package folder or module file.

    Called at most once a second while a client submits. Each module is judged once per process (by name and
    file). A module from outside the installation may still be an installed distribution (an editable install):
    the installed distributions are read — once per call, and only when such a module is new — which costs
    ~0.2 s with a HEP stack; a client starts the first reading in the background (:func:`prepare`).
    """
    global _installed
    with _lock:
        modules = {  # (name, file) → module: a module replaced by another file is judged again
            (name, str(getattr(module, "__file__", None))): module
            for name, module in list(sys.modules.items())
            if "." not in name and name != "__main__"
        }
        fresh = {seen: _outside(module) for seen, module in modules.items() if seen not in _verdicts}
        if any(path is not None and name not in _installed for (name, _), path in fresh.items()):
            from importlib.metadata import packages_distributions

            _installed = set(packages_distributions())
        for (name, file), path in fresh.items():
            _verdicts[name, file] = None if name in _installed else path
        return {name: path for (name, file) in modules if (path := _verdicts[name, file]) is not None}


def prepare() -> None:
    """Judge the modules imported so far in the background (a client does it as it starts), so that the first
    ``submit`` does not wait for the reading of the installed distributions."""
    threading.Thread(target=local_modules, name="mqexec-codeship", daemon=True).start()


def _origin(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(os.path.realpath(file))
    return path.parent if path.name == "__init__.py" else path


def archive(modules: dict[str, Path] | None = None) -> Archive | None:
    """A deterministic zip of the modules' ``.py`` files (None when there is nothing to ship)."""
    modules = local_modules() if modules is None else modules
    if not modules:
        return None
    files: dict[str, Path] = {}
    for name, path in sorted(modules.items()):
        if path.is_dir():
            for f in sorted(path.rglob("*.py")):
                if "__pycache__" not in f.parts:
                    files[f"{name}/{f.relative_to(path).as_posix()}"] = f
        else:
            files[f"{name}.py"] = path
    buf = io.BytesIO()
    total = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, f in files.items():
            data = f.read_bytes()
            total += len(data)
            if len(data) > _MAX_FILE or total > _MAX_TOTAL:
                raise ValueError(
                    f"the analysis's modules are too big to ship ({f}); install them on the workers and "
                    "set ship_code=False"
                )
            zf.writestr(zipfile.ZipInfo(rel, _EPOCH), data)
        manifest = {rel: str(f) for rel, f in files.items()}
        zf.writestr(zipfile.ZipInfo(_MANIFEST, _EPOCH), json.dumps(manifest, sort_keys=True))
    data = buf.getvalue()
    return Archive(data, sha256(data), sorted(modules))


class Shipper:
    """The client's archive, rebuilt when the analysis imports a new local module or edits one (checked at most
    once a second)."""

    def __init__(self) -> None:
        self._current: Archive | None = None
        self._stamp: Any = None
        self._checked = 0.0
        prepare()

    def current(self) -> Archive | None:
        now = time.monotonic()
        if now - self._checked < 1.0 and self._stamp is not None:
            return self._current
        self._checked = now
        modules = local_modules()
        stamp = tuple(sorted((n, str(p), _mtime(p)) for n, p in modules.items()))
        if stamp != self._stamp:
            self._stamp = stamp
            self._current = archive(modules)
        return self._current


def _mtime(path: Path) -> int:
    if path.is_dir():
        return max((f.stat().st_mtime_ns for f in path.rglob("*.py")), default=0)
    return path.stat().st_mtime_ns


class Installer:
    """A worker process's side: puts an archive's folder at the front of ``sys.path``."""

    def __init__(self, cache_dir: str) -> None:
        self.root = Path(cache_dir) / "code"
        self.active: str | None = None
        self._names: list[str] = []
        self._manifest: dict[str, str] = {}

    def activate(self, digest: str, fetch: Any) -> None:
        """Make archive ``digest`` (bytes from ``fetch()``) the importable one."""
        if digest == self.active:
            return
        folder = self.root / digest
        if not folder.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=self.root))
            with zipfile.ZipFile(io.BytesIO(fetch())) as zf:
                zf.extractall(tmp)
            try:
                os.rename(tmp, folder)
            except OSError:  # another pool process extracted it first
                shutil.rmtree(tmp, ignore_errors=True)
        manifest = json.loads((folder / _MANIFEST).read_text())
        names = sorted({rel.split("/")[0].removesuffix(".py") for rel in manifest})
        for name in set(names) | set(self._names):
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
        if self.active is not None:
            old = str(self.root / self.active)
            sys.path[:] = [p for p in sys.path if p != old]
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        self.active, self._names = digest, names
        self._manifest = {str(folder / rel): original for rel, original in manifest.items()}

    def client_path(self, filename: str) -> str:
        """The analyst's own path of a file of the active archive (others unchanged)."""
        return self._manifest.get(filename, filename)
