"""``mqexec cache ls | du | rm``: what a data-lake cache holds, how big it is, and cleaning it.

    mqexec cache ls  [URL]                                 one line per namespace: records, size, newest, what
    mqexec cache du  [URL]                                 the same, summed up
    mqexec cache rm  [URL] [NAMESPACE ...] [--older-than 30d] [--all] [--dry-run]

``URL`` defaults to ``MQEXEC_CACHE_URL``. Listing a big cache takes one listing per namespace; a progress bar
(on stderr, in a terminal only) shows how far it is. ``rm`` removes records (and a writer's leftover
``*.tmp-*`` files), never anything outside ``<URL>/cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .cache import ABOUT
from .config import parse_duration
from .lake import Entry, Lake, LakeError

__all__ = ["register_cli"]


@dataclass
class _Namespace:
    name: str
    entries: list[Entry]
    about: str

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def newest(self) -> float:
        return max((e.mtime for e in self.entries), default=0.0)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _lake(url: str | None) -> Lake:
    if not url:
        raise LakeError("no cache URL: give one (mqexec cache ls root://host//path) or set MQEXEC_CACHE_URL")
    return Lake(url if "://" in url else "file://" + os.path.abspath(os.path.expanduser(url)))


def _scan(lake: Lake, only: list[str] | None = None) -> Iterator[_Namespace]:
    """Every namespace (or those in ``only``) with its records, listed one by one under a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    names = [n for n in lake.cache_namespaces() if not only or n in only]
    console = Console(stderr=True)
    columns = (TextColumn("listing {task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(lake.url, total=len(names))
        for name in names:
            entries = [e for e in lake.listdir(f"cache/{name}") if not e.is_dir]  # with leftover *.tmp-* files
            about = ""
            if any(e.name == ABOUT for e in entries):
                try:
                    about = (lake.cache_get(name, ABOUT) or b"").decode(errors="replace")
                except LakeError:
                    about = "?"
            progress.advance(task)
            yield _Namespace(name, [e for e in entries if e.name != ABOUT], about)


def _ls(args: argparse.Namespace) -> int:
    lake = _lake(args.url)
    rows = [ns for ns in _scan(lake) if ns.entries]
    print(f"{'NAMESPACE':<64} {'RECORDS':>8} {'SIZE':>10}  {'NEWEST':<16}  WHAT")
    for ns in rows:
        newest = time.strftime("%Y-%m-%d %H:%M", time.localtime(ns.newest)) if ns.newest else "?"
        print(f"{ns.name:<64} {len(ns.entries):>8} {_size(ns.size):>10}  {newest:<16}  {ns.about}")
    return 0


def _du(args: argparse.Namespace) -> int:
    lake = _lake(args.url)
    rows = [ns for ns in _scan(lake) if ns.entries]
    for ns in rows:
        print(f"{_size(ns.size):>10}  {len(ns.entries):>8} records  {ns.name}")
    total = sum(ns.size for ns in rows)
    count = sum(len(ns.entries) for ns in rows)
    print(f"{_size(total):>10}  {count:>8} records  total in {lake.url}/cache ({len(rows)} namespaces)")
    return 0


def _rm(args: argparse.Namespace) -> int:
    if args.url and "://" not in args.url and not args.url.startswith(("/", "~", ".")):
        args.namespaces.insert(0, args.url)  # ``mqexec cache rm NAMESPACE`` with MQEXEC_CACHE_URL set
        args.url = os.environ.get("MQEXEC_CACHE_URL")
    if not (args.namespaces or args.older_than or args.all):
        print("mqexec cache rm: say what to remove: NAMESPACE ..., --older-than AGE, or --all", file=sys.stderr)
        return 2
    lake = _lake(args.url)
    older = parse_duration(args.older_than) if args.older_than else None
    cutoff = time.time() - older if older is not None else None
    removed = size = 0
    for ns in _scan(lake, args.namespaces or None):
        doomed = [e for e in ns.entries if cutoff is None or e.mtime < cutoff]
        for entry in doomed:
            if not args.dry_run:
                lake.cache_remove(ns.name, entry.name)
        removed += len(doomed)
        size += sum(e.size for e in doomed)
        if len(doomed) == len(ns.entries) and not args.dry_run:  # nothing left: its description goes too
            with contextlib.suppress(LakeError):  # it had none
                lake.cache_remove(ns.name, ABOUT)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {removed} records ({_size(size)}) from {lake.url}/cache")
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``mqexec cache ls | du | rm`` to an ``argparse`` sub-parser set (each sets ``run=``)."""
    cache = subparsers.add_parser("cache", help="list, measure and clean a data-lake cache")
    sub = cache.add_subparsers(dest="cache_command", required=True)
    url_help = "the cache's lake URL (default: MQEXEC_CACHE_URL)"
    for name, run, text in (
        ("ls", _ls, "one line per namespace: records, size, newest record, what made it"),
        ("du", _du, "sizes per namespace and in total"),
        ("rm", _rm, "remove records: of NAMESPACEs, older than an age, or all"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("url", nargs="?", default=os.environ.get("MQEXEC_CACHE_URL"), help=url_help)
        p.set_defaults(run=run)
        if name == "rm":
            p.add_argument("namespaces", nargs="*", metavar="NAMESPACE", help="only these namespaces")
            p.add_argument("--older-than", metavar="AGE", help="only records older than this (90s, 12h, 30d)")
            p.add_argument("--all", action="store_true", help="every record of the cache")
            p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
