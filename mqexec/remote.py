"""Exceptions across the wire, without pickles: described on the worker, rebuilt on the client.

    worker: describe(exc) → {"type": "builtins.KeyError", "args": ["x"], "str": "'x'", "frames": [[file, line,
            name, source], ...], "notes": [...], "cause": {...}, "context": {...}}        (JSON, in the result)
    client: rebuild(d)    → KeyError('x') with a real traceback object whose frames are the remote ones

The client never unpickles what a worker sent on the error path (a worker is not trusted with the analyst's
machine; see ``keys.py``). The original type comes back where it is importable here without importing anything
(its module is already loaded) and is an ``Exception`` subclass; it is built from JSON primitives only, bypassing
a custom ``__init__``. Anything else — also a description that is not what :func:`describe` makes — becomes a
:class:`~mqexec.errors.RemoteError` naming the remote type; :func:`rebuild` never raises.
Frames of mqexec's own machinery are dropped on the worker, so the traceback reads like a local one.

    >>> try:
    ...     {}["x"]
    ... except KeyError as exc:
    ...     back = rebuild(describe(exc))
    >>> type(back).__name__, back.args
    ('KeyError', ('x',))
"""

from __future__ import annotations

import builtins
import linecache
import os
import sys
import traceback
import types
from typing import Any

from .errors import RemoteError

_MAX_DEPTH = 5  #: causes / contexts followed
_MAX_FRAMES = 100
_MAX_TEXT = 20_000
_MAX_LINE = 1_000_000_000  #: a line number a frame can have (C int)
_MAX_SOURCE_LINE = 10_000  #: remote source lines shown in tracebacks up to this line of a file
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_INTERNAL = (_HERE, f"{os.sep}celery{os.sep}", f"{os.sep}billiard{os.sep}")


def _primitive(value: Any, depth: int = 0) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return not isinstance(value, str) or len(value) <= _MAX_TEXT
    if isinstance(value, list | tuple) and depth < 3 and len(value) <= 50:
        return all(_primitive(v, depth + 1) for v in value)
    return False


def describe(exc: BaseException, depth: int = 0) -> dict[str, Any]:
    """A JSON-safe description of ``exc``: type, primitive args, message, frames (mqexec's own dropped), notes,
    cause and context."""
    cls = type(exc)
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not lose the error
        text = f"<{cls.__name__}: str() failed>"
    frames = [
        [f.filename, f.lineno or 0, f.name, f.line or ""]
        for f in traceback.extract_tb(exc.__traceback__)[-_MAX_FRAMES:]
        if not f.filename.startswith(_INTERNAL[0]) and not any(p in f.filename for p in _INTERNAL[1:])
    ]
    out: dict[str, Any] = {
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "args": list(exc.args) if _primitive(list(exc.args)) else None,
        "str": text[:_MAX_TEXT],
        "frames": frames,
        "notes": [str(n)[:_MAX_TEXT] for n in getattr(exc, "__notes__", [])][:20],
        "suppress": exc.__suppress_context__,
    }
    if depth < _MAX_DEPTH:
        if exc.__cause__ is not None:
            out["cause"] = describe(exc.__cause__, depth + 1)
        if exc.__context__ is not None and not exc.__suppress_context__:
            out["context"] = describe(exc.__context__, depth + 1)
    return out


def _exception_type(name: str) -> type[Exception] | None:
    """The class called ``module.Qual.Name`` if its module is already imported and it is an exception class.

    Looked up in the module's and classes' own namespaces (no ``__getattr__`` hook runs for a name a worker
    chose). Only :class:`Exception` subclasses: a worker does not get to raise ``SystemExit``, ``KeyboardInterrupt``
    or ``asyncio.CancelledError`` — control flow — in the client.
    """
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module = sys.modules.get(".".join(parts[:split]))
        if module is None:
            continue
        obj: Any = module
        for attr in parts[split:]:
            obj = vars(obj).get(attr) if isinstance(obj, types.ModuleType | type) else None
        if isinstance(obj, type) and issubclass(obj, Exception) and f"{obj.__module__}.{obj.__qualname__}" == name:
            return obj
        return None
    return None


def _instance(cls: type[Exception], args: tuple[Any, ...]) -> Exception:
    if cls.__module__ == "builtins" or cls.__init__ is BaseException.__init__:
        return cls(*args)
    exc = cls.__new__(cls, *args)  # a custom __init__ is not run with values a worker chose
    BaseException.__init__(exc, *args)
    return exc


def rebuild(d: Any, worker: str = "", depth: int = 0) -> BaseException:
    """The exception ``describe`` described, with its remote frames as a real traceback.

    Never raises: a worker is not trusted, so a description that is not what :func:`describe` makes becomes a
    :class:`~mqexec.errors.RemoteError` saying so (and its future fails with it rather than staying pending).
    """
    try:
        exc = _rebuild(d, depth)
    except Exception as bad:
        exc = RemoteError(
            f"a worker sent an error description that mqexec cannot read ({type(bad).__name__}: {bad})"[:_MAX_TEXT],
            remote_type="?",
        )
    if depth == 0 and worker:
        exc.add_note(f"(raised on mqexec worker {worker})")
    return exc


def _rebuild(d: dict[str, Any], depth: int) -> BaseException:
    if not isinstance(d, dict):
        raise TypeError(f"a {type(d).__name__}, not a JSON object")
    name = str(d.get("type", "builtins.Exception"))[:_MAX_TEXT]
    text = str(d.get("str", ""))[:_MAX_TEXT]
    args = tuple(d["args"]) if isinstance(d.get("args"), list) else (text,)
    cls = _exception_type(name)
    exc: BaseException | None = None
    if cls is not None:
        try:
            exc = _instance(cls, args)
            str(exc)
        except Exception:
            exc = None
    if exc is None:
        exc = RemoteError(f"{name}: {text}" if text else name, remote_type=name)
    for note in list(d.get("notes") or [])[:20]:
        exc.add_note(str(note)[:_MAX_TEXT])
    if depth < _MAX_DEPTH:
        if d.get("cause"):
            exc.__cause__ = rebuild(d["cause"], depth=depth + 1)
        if d.get("context"):
            exc.__context__ = rebuild(d["context"], depth=depth + 1)
    exc.__suppress_context__ = bool(d.get("suppress"))
    return exc.with_traceback(traceback_of(list(d.get("frames") or [])))


def traceback_of(frames: list[list[Any]]) -> types.TracebackType | None:
    """A real traceback object with the given ``[file, line, name, source]`` frames (outermost first).

    Each frame is a stub frame whose code carries the remote file and function name; where the file does not
    exist here, its source line is put into ``linecache`` so printed tracebacks show it (for the first
    :data:`_MAX_SOURCE_LINE` lines of a file: further down, the padding would cost memory a worker chose).
    """
    tb: types.TracebackType | None = None
    for filename, lineno, name, source in reversed(frames[-_MAX_FRAMES:]):
        filename, name, lineno = str(filename)[:4096], str(name)[:200], min(max(int(lineno), 1), _MAX_LINE)
        if source and lineno <= _MAX_SOURCE_LINE and not os.path.exists(filename) and filename not in linecache.cache:
            lines = ["\n"] * (lineno - 1) + [str(source)[:_MAX_TEXT] + "\n"]
            linecache.cache[filename] = (len(source), None, lines, filename)
        tb = types.TracebackType(tb, _stub_frame(filename, name), -1, lineno)
    return tb


def _stub_frame(filename: str, name: str) -> types.FrameType:
    safe = name if name.isidentifier() else "remote"
    code = compile("import sys\n_frame = sys._getframe()", filename, "exec").replace(co_name=safe, co_qualname=safe)
    namespace: dict[str, Any] = {"__name__": "mqexec.remote.frame", "__builtins__": builtins}
    exec(code, namespace)
    frame: types.FrameType = namespace["_frame"]
    return frame
