"""The data lake: a content-addressed result store and chunk cache on grid storage.

Big results go here instead of through the broker; the message carries a :class:`LakeRef`::

    >>> lake = open_lake("file:///tmp/lake")            # or root://host:1094//data/lake, davs://host/lake
    >>> ref = lake.put(b"big result")                    # <url>/objects/<sha[:2]>/<sha>
    >>> lake.get(LakeRef.from_dict(ref.to_dict()))       # size and sha256 verified
    b'big result'

``file://`` is handled with the standard library; every other scheme goes through fsspec, imported only when
such a lake is opened (``root://`` via fsspec-xrootd, ``dav://``/``davs://``/``http(s)://`` via webdav4, with the
grid credentials of the environment: :mod:`mqexec.lake_auth`).

    writer ──open_atomic(path)──▶ <path>.tmp-<random> ──close: rename (os.replace / kXR_mv / MOVE)──▶ <path>
    reader ──▶ <path>: the whole object or nothing, never a torn one

Layout: ``objects/<sha[:2]>/<sha>`` (results by content), ``cache/<namespace>/<key>`` (cache records: a header
``MQXC1 <sha256>`` + payload, checked on every read), anything else (``open_output``, ``save=``) by its name.

One piece because: every lake operation — put, get, records, named outputs, listings — goes through the same
atomic-write and error-naming rules for three kinds of storage (local, XRootD, WebDAV).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from .errors import MQExecError

# open_output: from mqexec.outputs, through the module's __getattr__
__all__ = ["Entry", "Lake", "LakeError", "LakeRef", "cache_key", "open_lake", "open_output"]  # noqa: F822

_WEBDAV = {"dav": "http", "davs": "https", "webdav": "https", "http": "http", "https": "https"}
_XROOTD = {"root", "xroot"}
# Object stores write an object atomically on close and have no cheap rename: write in place there.
_NO_RENAME = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
_CACHE_MAGIC = b"MQXC1 "  # cache record = magic + sha256 hex of the payload + b"\n" + payload
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{3,200}$")


class LakeError(MQExecError):
    """A data-lake operation failed; the message names the URL and the cause (never a credential).

    ``kind`` is ``"missing object"``, ``"authentication/permission refused"``, ``"server unreachable"``,
    ``"corrupt"`` or None (anything else)."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Entry:
    """One listed object: ``Entry(name, size, mtime)`` (``mtime`` in seconds since the epoch, 0 if unknown)."""

    name: str
    size: int
    mtime: float
    is_dir: bool = False


@dataclass(frozen=True)
class LakeRef:
    """What travels in a result message instead of the bytes: ``LakeRef(url, size, sha256)``."""

    url: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """``{"url": ..., "size": ..., "sha256": ...}`` (JSON-safe)."""
        return {"url": self.url, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LakeRef:
        """``LakeRef.from_dict(ref.to_dict()) == ref``."""
        try:
            return cls(url=str(d["url"]), size=int(d["size"]), sha256=str(d["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LakeError(f"not a lake reference: {d!r} ({exc})") from exc


def cache_key(*parts: str | int | bytes) -> str:
    """Chunk-cache key from its parts: ``cache_key(processor_sha, file_uuid, tree, start, stop)``."""
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        h.update(len(b).to_bytes(8, "big") + b)  # length-prefixed: ("ab", "c") != ("a", "bc")
    return h.hexdigest()


_CAUSES = [  # (kind, exception types, pattern over "TypeName: message"); word bounds keep sha256s from matching
    ("missing object", (FileNotFoundError,), r"\[3011\]|no such file|\b404\b"),
    (
        "authentication/permission refused",
        (PermissionError,),
        r"\[3010\]|\b40[13]\b|not authori[sz]ed|unauthori[sz]ed|permission denied|forbidden",
    ),
    (
        "server unreachable",
        (ConnectionError, TimeoutError),
        r"connect(ion|error)|operation expired|unreachable|timed ?out|name resolution",
    ),
]


def _redact(text: str) -> str:
    """``text`` without the bearer token of this process, should a server or library ever echo it."""
    from .lake_auth import bearer_token

    token = bearer_token() or ""
    return text.replace(token, "<token>") if len(token) >= 8 else text


def _classify(exc: BaseException) -> tuple[str | None, str]:
    """``("missing object", "FileNotFoundError: ...")``: the kind of failure (None if unknown) and its text."""
    text = _redact(f"{type(exc).__name__}: {exc}")
    for kind, types, pattern in _CAUSES:
        if isinstance(exc, types) or re.search(pattern, text, re.IGNORECASE):
            return kind, text
    return None, text


def _cause(exc: BaseException) -> str:
    """Name the kind of failure for the error message: ``missing object (FileNotFoundError: ...)``."""
    kind, text = _classify(exc)
    return f"{kind} ({text})" if kind else text


class _Atomic:
    """A file being written under a temporary name; ``close()`` renames it into place, an error drops it."""

    def __init__(self, f: IO[bytes], commit: Callable[[], None], abort: Callable[[], None], url: str) -> None:
        self._f, self._commit, self._abort, self.url = f, commit, abort, url
        self.closed = False

    def write(self, data: bytes) -> int:
        return self._f.write(data) or len(data)

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._f.close()
            self._commit()

    def discard(self) -> None:
        """Drop what was written; nothing appears at the final name."""
        if not self.closed:
            self.closed = True
            try:
                self._f.close()
            finally:
                self._abort()

    def __enter__(self) -> _Atomic:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


class _SyncedFile(io.FileIO):
    """A local file that reaches the disk (fsync) before it is closed, and so before it is renamed."""

    def close(self) -> None:
        if not self.closed:
            os.fsync(self.fileno())
        super().close()


class _Local:
    """POSIX directory: write to a unique temporary name, fsync, then os.replace (atomic)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def size(self, path: str) -> int | None:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def open_atomic(self, path: str, url: str) -> _Atomic:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"

        def commit() -> None:
            try:
                os.replace(tmp, path)
            except BaseException:
                abort()
                raise

        def abort() -> None:
            if os.path.exists(tmp):
                os.unlink(tmp)

        return _Atomic(_SyncedFile(tmp, "wb"), commit, abort, url)

    def listdir(self, path: str) -> list[Entry]:
        try:
            with os.scandir(path) as it:
                return [
                    Entry(e.name, st.st_size, st.st_mtime, e.is_dir())
                    for e in it
                    for st in [e.stat(follow_symlinks=False)]
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove(self, path: str) -> None:
        os.unlink(path)


def _mtime(info: dict[str, Any]) -> float:
    value = info.get("mtime", info.get("modified", info.get("LastModified", 0)))
    return value.timestamp() if hasattr(value, "timestamp") else float(value or 0)


class _Fsspec:
    """Any fsspec filesystem; temporary name + ``mv`` unless the store has no rename."""

    def __init__(self, fs: Any, root: str, rename: bool, move: Any = None) -> None:
        self.fs, self.root, self.rename, self.move = fs, root, rename, move or fs.mv

    def _missing(self, exc: OSError) -> bool:
        return _classify(exc)[0] == "missing object"

    def size(self, path: str) -> int | None:
        self.fs.invalidate_cache(path)  # never trust a cached listing for "is it there?"
        try:
            return int(self.fs.info(path)["size"])
        except OSError as exc:  # fsspec-xrootd raises plain OSError with the server's text
            if self._missing(exc):
                return None
            raise

    def read(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def open_atomic(self, path: str, url: str) -> _Atomic:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        target = f"{path}.tmp-{uuid.uuid4().hex}" if self.rename else path

        def commit() -> None:
            if target == path:
                return
            try:
                self.move(target, path)
            except Exception:
                abort()
                raise

        def abort() -> None:
            with contextlib.suppress(OSError):  # never written, or already gone: nothing to clean
                self.fs.rm(target)

        return _Atomic(self.fs.open(target, "wb"), commit, abort, url)

    def listdir(self, path: str) -> list[Entry]:
        self.fs.invalidate_cache(path)
        try:
            infos = self.fs.ls(path, detail=True)
        except OSError as exc:
            if self._missing(exc):
                return []
            raise
        return [
            Entry(
                str(i["name"]).rstrip("/").rsplit("/", 1)[-1],
                int(i.get("size") or 0),
                _mtime(i),
                i["type"] == "directory",
            )
            for i in infos
        ]

    def remove(self, path: str) -> None:
        self.fs.rm(path)


class Lake:
    """A data lake at ``url``, e.g. ``Lake("root://localhost:1094//data/lake")`` or
    ``Lake("davs://host/lake", auth=("user", "pw"))``; ``storage_options`` go to the fsspec filesystem.
    Without ``auth``/``verify``, a WebDAV lake uses the grid credentials of the environment
    (:func:`mqexec.lake_auth.webdav_options`)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url.rstrip("/") if urlsplit(url).path.strip("/") else url
        self._base = self.url if self.url.endswith("/") else self.url + "/"
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            if scheme == "file":
                self._store: _Local | _Fsspec = _Local(unquote(parts.path).rstrip("/") or "/")
                return
            if scheme in _WEBDAV:
                from webdav4.fsspec import WebdavFileSystem

                from .lake_auth import webdav_options

                options = webdav_options(storage_options)
                fs = WebdavFileSystem(f"{_WEBDAV[scheme]}://{parts.netloc}/", **options)
                # WebDAV MOVE with "Overwrite: T" is a server-side rename (fs.mv would copy + delete)
                move = partial(fs.client.move, overwrite=True)
                self._store = _Fsspec(fs, unquote(parts.path).strip("/"), rename=True, move=move)
                return
            import fsspec

            if scheme in _XROOTD:
                url = "root" + url[len(scheme) :]
            fs, root = fsspec.core.url_to_fs(url, **storage_options)
            self._store = _Fsspec(fs, root.rstrip("/"), rename=scheme not in _NO_RENAME)
        except ImportError as exc:
            pkg = "fsspec-xrootd" if scheme in _XROOTD else "webdav4" if scheme in _WEBDAV else "fsspec"
            raise LakeError(f"{url}: cannot open lake, {exc} (pip install {pkg})") from exc
        except Exception as exc:
            raise LakeError(f"{url}: cannot open lake: {_cause(exc)}") from exc

    def __repr__(self) -> str:
        return f"Lake({self.url!r})"

    def _path(self, rel: str) -> str:
        root = self._store.root
        return f"{root}/{rel}" if root else rel

    def _call(self, url: str, what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except LakeError:
            raise
        except Exception as exc:
            raise LakeError(f"{url}: {what} failed: {_cause(exc)}", _classify(exc)[0]) from exc

    def _rel(self, ref: LakeRef) -> str:
        if not ref.url.startswith(self._base):
            raise LakeError(f"{ref.url}: not an object of the lake {self.url}")
        return ref.url[len(self._base) :]

    def url_of(self, rel: str) -> str:
        """``lake.url_of("skims/a.parquet")`` → ``<lake url>/skims/a.parquet``."""
        return self._base + rel.lstrip("/")

    # -------------------------------------------------------------------------------- named objects
    def write(self, rel: str, data: bytes) -> str:
        """Write ``data`` at ``<url>/<rel>`` atomically (last writer wins); returns its URL."""
        with self.open_write(rel) as f:
            self._call(f.url, "write", f.write, bytes(data))
        return f.url

    def open_write(self, rel: str) -> _Atomic:
        """``with lake.open_write("skims/a.parquet") as f: f.write(...)`` — visible at ``f.url`` only once
        closed without an error; an exception inside the block leaves nothing behind."""
        url = self.url_of(rel)
        atomic: _Atomic = self._call(url, "open for writing", self._store.open_atomic, self._path(rel), url)
        commit, abort = atomic._commit, atomic._abort
        atomic._commit = lambda: self._call(url, "write", commit)
        atomic._abort = lambda: self._call(url, "clean-up", abort)
        return atomic

    def read(self, rel: str) -> bytes:
        """The bytes at ``<url>/<rel>``; LakeError (``missing object``) if there is none."""
        return self._call(self.url_of(rel), "read", self._store.read, self._path(rel))

    def size(self, rel: str) -> int | None:
        """Size of ``<url>/<rel>``, or None if it is not there."""
        return self._call(self.url_of(rel), "stat", self._store.size, self._path(rel))

    def listdir(self, rel: str = "") -> list[Entry]:
        """The entries of the folder ``<url>/<rel>`` (``[]`` if there is no such folder)."""
        path = self._path(rel.strip("/")) if rel.strip("/") else self._store.root
        return self._call(self.url_of(rel), "list", self._store.listdir, path)

    def remove(self, rel: str) -> None:
        """Remove ``<url>/<rel>``; LakeError if it is not there."""
        self._call(self.url_of(rel), "delete", self._store.remove, self._path(rel))

    # ------------------------------------------------------------------------ content-addressed results
    def put(self, data: bytes) -> LakeRef:
        """Store ``data`` at ``<url>/objects/<sha[:2]>/<sha>``: ``ref = lake.put(b"...")``. Idempotent."""
        sha = hashlib.sha256(data).hexdigest()
        rel = f"objects/{sha[:2]}/{sha}"
        ref = LakeRef(self._base + rel, len(data), sha)
        if self.size(rel) != len(data):
            self.write(rel, data)
        return ref

    def get(self, ref: LakeRef) -> bytes:
        """``lake.get(ref) -> bytes``, verified against ``ref.size`` and ``ref.sha256``."""
        data = self.read(self._rel(ref))
        if len(data) != ref.size:
            raise LakeError(f"{ref.url}: corrupt object: size {len(data)} != expected {ref.size}", "corrupt")
        sha = hashlib.sha256(data).hexdigest()
        if sha != ref.sha256:
            raise LakeError(f"{ref.url}: corrupt object: sha256 {sha} != expected {ref.sha256}", "corrupt")
        return data

    def delete(self, ref: LakeRef) -> None:
        """``lake.delete(ref)``; LakeError if it is not there."""
        self.remove(self._rel(ref))

    # ---------------------------------------------------------------------------------- cache records
    def _cache_rel(self, namespace: str, key: str = "") -> str:
        for name in (namespace, key) if key else (namespace,):
            if not _KEY_RE.match(name):
                raise LakeError(f"{self.url}: bad cache name {name!r} (want 3-200 chars of [A-Za-z0-9._-])")
        return f"cache/{namespace}/{key}" if key else f"cache/{namespace}"

    def cache_url(self, namespace: str, key: str) -> str:
        """URL of a cache record: ``<url>/cache/<namespace>/<key>``."""
        return self.url_of(self._cache_rel(namespace, key))

    def cache_get(self, namespace: str, key: str) -> bytes | None:
        """``lake.cache_get("ns", cache_key(...))`` → the payload, or None if absent; LakeError if corrupt."""
        rel = self._cache_rel(namespace, key)
        try:
            raw = self.read(rel)
        except LakeError as exc:
            if exc.kind == "missing object":
                return None
            raise
        head, sep, data = raw.partition(b"\n")
        if (
            not (sep and head.startswith(_CACHE_MAGIC))
            or head[len(_CACHE_MAGIC) :].decode(errors="replace") != hashlib.sha256(data).hexdigest()
        ):
            raise LakeError(f"{self.url_of(rel)}: corrupt cache record (sha256 does not match its header)", "corrupt")
        return data

    def cache_put(self, namespace: str, key: str, data: bytes) -> str:
        """``lake.cache_put("ns", cache_key(...), b"...")``; last writer wins; never seen half-written."""
        record = _CACHE_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + bytes(data)
        return self.write(self._cache_rel(namespace, key), record)

    def cache_list(self, namespace: str) -> dict[str, Entry]:
        """The records of a namespace, ``{key: Entry}`` — one listing, whatever their number."""
        entries = self.listdir(self._cache_rel(namespace))
        return {e.name: e for e in entries if not e.is_dir and ".tmp-" not in e.name}

    def cache_namespaces(self) -> list[str]:
        """The namespaces that have records (or had: an emptied folder may stay on some storages)."""
        return sorted(e.name for e in self.listdir("cache") if e.is_dir)

    def cache_remove(self, namespace: str, key: str) -> None:
        """Remove one record (or a leftover ``*.tmp-*`` file)."""
        self.remove(f"{self._cache_rel(namespace)}/{key}")


def _known_schemes() -> list[str]:
    try:
        from fsspec.registry import known_implementations

        names = set(known_implementations)
    except ImportError:
        names = set()
    return sorted(names | {"file", "root", "dav", "davs"} | _WEBDAV.keys() | _XROOTD)


def open_lake(url: str | None, **storage_options: Any) -> Lake | None:
    """``open_lake(None) is None``; ``open_lake("/tmp/lake")`` is ``Lake("file:///tmp/lake")``."""
    if url is None:
        return None
    if "://" not in url:
        return Lake("file://" + os.path.abspath(os.path.expanduser(url)), **storage_options)
    scheme = url.split("://", 1)[0].lower()
    known = _known_schemes()
    if scheme not in known:
        preferred = ["file", "root", "davs", "dav", "https"]
        close = difflib.get_close_matches(scheme, preferred, n=2)
        others = [s for s in difflib.get_close_matches(scheme, known, n=3) if s not in close]
        close += others[: 3 - len(close)]
        hint = f"; did you mean {' or '.join(s + '://' for s in close)}?" if close else ""
        raise LakeError(f"{url}: unknown lake scheme {scheme!r}{hint}")
    return Lake(url, **storage_options)


def __getattr__(name: str) -> Any:
    """``mqexec.lake.open_output`` lives in :mod:`mqexec.outputs` (it needs the task's context)."""
    if name == "open_output":
        from .outputs import open_output

        return open_output
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
