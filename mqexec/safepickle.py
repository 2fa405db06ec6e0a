"""A restricted unpickler for values that come back from workers.

Unpickling runs code: a pickle can call any importable function with arguments of its choosing (``os.system``,
or ``numpy.savetxt`` writing a ``~/.bashrc``). A worker runs on a machine the analyst does not control, so what it
sends back is unpickled here only through an allow-list of classes and reconstructors — Python's plain data types,
numpy arrays and scalars, awkward arrays, hist / boost-histogram histograms, coffea accumulators — plus what the
analyst allows (:func:`allow`). ``MQExecutor`` outputs are always read this way; ``Client(safe_results=True)``
reads every result this way. A refused class is named in the error with the call that allows it.

    >>> import numpy as np, pickle
    >>> loads(pickle.dumps({"n": np.arange(3)}))["n"].sum()
    np.int64(3)
    >>> loads(pickle.dumps(print))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mqexec.errors.UnsafeResultError: a worker's result holds builtins.print, which mqexec does not unpickle ...
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from typing import Any

from .errors import UnsafeResultError

_BUILTINS = {
    "bool",
    "int",
    "float",
    "complex",
    "str",
    "bytes",
    "bytearray",
    "list",
    "tuple",
    "dict",
    "set",
    "frozenset",
    "range",
    "slice",
}
_ALLOWED: set[tuple[str, str]] = {
    *(("builtins", n) for n in _BUILTINS),
    ("_codecs", "encode"),  # protocol-2 pickles of bytes
    ("copyreg", "_reconstructor"),  # protocol 0/1 objects; the class it builds must itself be allowed
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("collections", "Counter"),
    ("collections", "deque"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    *((m, n) for m in ("numpy._core.multiarray", "numpy.core.multiarray") for n in ("_reconstruct", "scalar")),
    *((m, "_frombuffer") for m in ("numpy._core.numeric", "numpy.core.numeric")),
    ("numpy.ma", "MaskedArray"),
    ("numpy.ma.core", "MaskedArray"),
    ("numpy.ma.core", "_mareconstruct"),
    ("awkward.highlevel", "Array"),
    ("awkward.highlevel", "Record"),
    ("dask_awkward.pickle", "_unpickle_array_schema_1"),
    ("dask_awkward.pickle", "_unpickle_record_schema_1"),
    ("coffea.processor.executor", "FileMeta"),  # coffea's preprocessing output
    ("coffea.processor.executor", "WorkItem"),  # coffea's "processed" sets (savemetrics)
    ("mqexec.adapters.coffea", "_Skipped"),  # MQExecutor's own answers
    ("mqexec.adapters.coffea", "_WriteFailed"),
}
#: packages whose *classes* (not functions) are allowed: histograms and coffea's accumulators
_CLASS_PACKAGES = ("hist", "boost_histogram", "coffea.processor.accumulator")
_extra: set[tuple[str, str]] = set()


def allow(*things: Any) -> None:
    """Let results hold these classes (or functions): objects, or ``"module.QualName"`` strings.

    >>> allow("mypackage.histos.MyAccumulator")          # doctest: +SKIP
    >>> allow(MyAccumulator)                              # doctest: +SKIP
    """
    for thing in things:
        if isinstance(thing, str):
            module, _, name = thing.rpartition(".")
            if not module:
                raise ValueError(f"allow() wants 'module.Name', got {thing!r}")
            _extra.add((module, name))
        else:
            _extra.add((thing.__module__, thing.__qualname__))


def _allowed(module: str, name: str) -> bool:
    if (module, name) in _ALLOWED or (module, name) in _extra:
        return True
    if "." not in name and any(module == p or module.startswith(p + ".") for p in _CLASS_PACKAGES):
        # a class defined in that module under that name — not one it merely imports or reaches: pickle resolves
        # ("coffea.processor.accumulator", "operator.attrgetter") to operator.attrgetter, and from there to exec
        obj = _lookup(module, name)
        return isinstance(obj, type) and obj.__module__ == module and obj.__qualname__ == name
    return False


def _lookup(module: str, name: str) -> Any:
    import importlib

    try:
        obj: Any = importlib.import_module(module)
        for attr in name.split("."):
            obj = getattr(obj, attr)
    except (ImportError, AttributeError):
        return None
    return obj


def _py3(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a Python 2 one (``__builtin__.long`` → ``builtins.int``), as pickle's ``fix_imports``
    maps it — done here, so the allow-list sees the name that is loaded."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module, name = _py3(module, name)
        if not _allowed(module, name):
            raise UnsafeResultError(
                f"a worker's result holds {module}.{name}, which mqexec does not unpickle from a worker unless you "
                f'allow it: mqexec.allow("{module}.{name}") (only for classes you trust)'
            )
        return super().find_class(module, name)


def loads(data: bytes) -> Any:
    """Unpickle ``data`` through the allow-list.

    Raises:
        UnsafeResultError: the pickle names a class or function that is not allowed.
    """
    return _Unpickler(io.BytesIO(data), fix_imports=False).load()
