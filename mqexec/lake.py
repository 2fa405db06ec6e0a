"""The data lake: a content-addressed result store and chunk cache on grid storage.

Big results go here instead of through the broker; the message carries a :class:`LakeRef`::

    >>> lake = open_lake("file:///tmp/lake")            # or root://host:1094//data/lake, davs://host/lake
    >>> ref = lake.put(b"big result")                    # <url>/objects/<sha[:2]>/<sha>
    >>> lake.get(LakeRef.from_dict(ref.to_dict()))       # size and sha256 verified
    b'big result'

``file://`` is handled with the standard library; every other scheme goes through fsspec, imported only when
such a lake is opened (``root://`` via fsspec-xrootd, ``dav://``/``davs://``/``http(s)://`` via webdav4).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["Lake", "LakeError", "LakeRef", "cache_key", "open_lake"]

_WEBDAV = {"dav": "http", "davs": "https", "webdav": "https", "http": "http", "https": "https"}
_XROOTD = {"root", "xroot"}
# Object stores write an object atomically on close and have no cheap rename: write in place there.
_NO_RENAME = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
_CACHE_MAGIC = b"MQXC1 "  # cache record = magic + sha256 hex of the payload + b"\n" + payload
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{3,200}$")


class LakeError(Exception):
    """A data-lake operation failed; the message names the URL and the cause."""


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


def _cause(exc: BaseException) -> str:
    """Name the kind of failure for the error message: ``missing object (FileNotFoundError: ...)``."""
    text = f"{type(exc).__name__}: {exc}"
    for kind, types, pattern in _CAUSES:
        if isinstance(exc, types) or re.search(pattern, text, re.IGNORECASE):
            return f"{kind} ({text})"
    return text


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

    def write(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def remove(self, path: str) -> None:
        os.unlink(path)


class _Fsspec:
    """Any fsspec filesystem; temporary name + ``mv`` unless the store has no rename."""

    def __init__(self, fs: Any, root: str, rename: bool, move: Any = None) -> None:
        self.fs, self.root, self.rename, self.move = fs, root, rename, move or fs.mv

    def size(self, path: str) -> int | None:
        self.fs.invalidate_cache(path)  # never trust a cached listing for "is it there?"
        try:
            return int(self.fs.info(path)["size"])
        except FileNotFoundError:
            return None
        except OSError as exc:  # fsspec-xrootd raises plain OSError with the server's text
            if _cause(exc).startswith("missing"):
                return None
            raise

    def read(self, path: str) -> bytes:
        with self.fs.open(path, "rb") as f:
            return f.read()

    def write(self, path: str, data: bytes) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        target = f"{path}.tmp-{uuid.uuid4().hex}" if self.rename else path
        with self.fs.open(target, "wb") as f:
            f.write(data)
        if target != path:
            try:
                self.move(target, path)
            except Exception:
                # Some servers refuse to overwrite: fine if a concurrent writer put the same content there.
                if self.size(path) != len(data):
                    raise
                self.fs.rm(target)

    def remove(self, path: str) -> None:
        self.fs.rm(path)


class Lake:
    """A data lake at ``url``, e.g. ``Lake("root://localhost:1094//data/lake")`` or
    ``Lake("davs://host/lake", auth=("user", "pw"))``; ``storage_options`` go to the fsspec filesystem."""

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

                fs = WebdavFileSystem(f"{_WEBDAV[scheme]}://{parts.netloc}/", **storage_options)
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
            raise LakeError(f"{url}: {what} failed: {_cause(exc)}") from exc

    def _rel(self, ref: LakeRef) -> str:
        if not ref.url.startswith(self._base):
            raise LakeError(f"{ref.url}: not an object of the lake {self.url}")
        return ref.url[len(self._base) :]

    def put(self, data: bytes) -> LakeRef:
        """Store ``data`` at ``<url>/objects/<sha[:2]>/<sha>``: ``ref = lake.put(b"...")``. Idempotent."""
        sha = hashlib.sha256(data).hexdigest()
        rel = f"objects/{sha[:2]}/{sha}"
        ref = LakeRef(self._base + rel, len(data), sha)
        path = self._path(rel)
        if self._call(ref.url, "stat", self._store.size, path) != len(data):
            self._call(ref.url, "write", self._store.write, path, bytes(data))
        return ref

    def get(self, ref: LakeRef) -> bytes:
        """``lake.get(ref) -> bytes``, verified against ``ref.size`` and ``ref.sha256``."""
        data = self._call(ref.url, "read", self._store.read, self._path(self._rel(ref)))
        if len(data) != ref.size:
            raise LakeError(f"{ref.url}: corrupt object: size {len(data)} != expected {ref.size}")
        sha = hashlib.sha256(data).hexdigest()
        if sha != ref.sha256:
            raise LakeError(f"{ref.url}: corrupt object: sha256 {sha} != expected {ref.sha256}")
        return data

    def delete(self, ref: LakeRef) -> None:
        """``lake.delete(ref)``; LakeError if it is not there."""
        self._call(ref.url, "delete", self._store.remove, self._path(self._rel(ref)))

    def _cache_rel(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise LakeError(f"{self.url}: bad cache key {key!r} (want 3-200 chars of [A-Za-z0-9._-])")
        return f"cache/{key[:2]}/{key}"

    def cache_get(self, key: str) -> bytes | None:
        """``lake.cache_get(cache_key(...))`` → the record, or None if absent; LakeError if corrupt."""
        rel = self._cache_rel(key)
        url, path = self._base + rel, self._path(rel)
        if self._call(url, "stat", self._store.size, path) is None:
            return None
        raw = self._call(url, "read", self._store.read, path)
        head, sep, data = raw.partition(b"\n")
        if (
            not (sep and head.startswith(_CACHE_MAGIC))
            or head[len(_CACHE_MAGIC) :].decode(errors="replace") != hashlib.sha256(data).hexdigest()
        ):
            raise LakeError(f"{url}: corrupt cache record (sha256 does not match its header)")
        return data

    def cache_put(self, key: str, data: bytes) -> None:
        """``lake.cache_put(cache_key(...), b"...")``; last writer wins; never seen half-written."""
        rel = self._cache_rel(key)
        record = _CACHE_MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + bytes(data)
        self._call(self._base + rel, "write", self._store.write, self._path(rel), record)


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
