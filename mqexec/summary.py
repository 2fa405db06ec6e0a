"""The run summary: one block of text at the end of a run, and the same numbers as JSON for scripts.

    Run(client)  ── Client.stats() at the start ─┐
    run.finish(output, chunks=, cache_hits=) ─────┼─▶ RunSummary ──▶ text() on stderr (when shown), one INFO line
        Client.stats() at the end (the difference)│                ──▶ to_json(), and last() for scripts
        coffea's output: metrics (savemetrics) or │
        the processed chunks' entry ranges ───────┘

What the counts mean (they come from the client's ledger, ``ledger.py``):

- ``tasks``: results received from workers (a chunk's, or a call's), split ``by_worker`` and ``by_site`` (the
  worker's DIRAC site; ``""`` for a worker outside a DIRAC job).
- ``resent``: calls sent again — ``lost`` (the worker's process died running it: a crash, out of memory),
  ``lapsed`` (the worker went silent and its lease ran out) or handed back by a worker that stopped first.
- ``duplicates``: results that arrived twice (a resent call that had run after all); dropped, never counted.
- ``dead_letters``: calls given up after ``delivery_limit`` deaths of their worker (``TaskDeadLettered`` on the
  client). A message the broker dead-letters (one a worker rejects as forged) shows in ``mqexec status``
  (``P.dead``), not here.
- ``cache_hits``: chunks (MQExecutor ``cache=``) or calls (``cache=True``) read from the cache instead of run.
- Retries inside a task (coffea's ``retries``, ``submit(retries=)``) happen on the worker and are not seen here.

    >>> run = Run(client)                                   # doctest: +SKIP
    >>> ...                                                  # submit, gather  # doctest: +SKIP
    >>> run.finish(show=True).to_json()["tasks"]            # doctest: +SKIP
    120
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("mqexec.client")
_last: RunSummary | None = None


@dataclass(frozen=True)
class RunSummary:
    """What one run did (see the module docstring for each count)."""

    seconds: float
    tasks: int
    chunks: int | None = None  #: coffea chunks of the run, from the cache included
    events: int | None = None
    bytes_read: int | None = None  #: coffea's ``bytesread`` (Runner ``savemetrics=True``)
    cache_hits: int = 0
    resent: int = 0
    lost: int = 0
    lapsed: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    by_worker: dict[str, int] = field(default_factory=dict)
    by_site: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float | None:
        if self.events is None or self.seconds <= 0:
            return None
        return self.events / self.seconds

    def to_json(self) -> dict[str, Any]:
        """The numbers as a JSON-ready dict (``events_per_s`` included)."""
        return {**asdict(self), "events_per_s": self.events_per_s}

    def line(self) -> str:
        """One line: ``120 chunks, 24000000 events in 95.3 s (251836 events/s) on 4 workers at 2 sites``."""
        what = f"{self.chunks} chunks, " if self.chunks is not None else ""
        what += f"{self.events} events" if self.events is not None else f"{self.tasks} tasks"
        rate = f" ({self.events_per_s:.0f} events/s)" if self.events_per_s is not None else ""
        sites = len(self.by_site)
        return f"{what} in {self.seconds:.1f} s{rate} on {len(self.by_worker)} workers at {sites} site(s)"

    def text(self) -> str:
        """The block printed at the end of a run."""
        rows = [("run", self.line())]
        if self.bytes_read is not None:
            rows.append(("read", human_bytes(self.bytes_read)))
        if self.cache_hits:
            rows.append(("cache hits", f"{self.cache_hits} read from the cache, not run"))
        rows.append(("tasks", f"{self.tasks} results"))
        for site, n in sorted(self.by_site.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append(("  site", f"{site or 'outside DIRAC'}: {n}"))
        for worker, n in sorted(self.by_worker.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append(("  worker", f"{worker}: {n}"))
        others = self.resent - self.lost - self.lapsed
        rows.append(("resent", f"{self.resent} (worker died: {self.lost}, went silent: {self.lapsed}, "
                               f"handed back: {max(others, 0)})"))  # fmt: skip
        rows.append(("duplicates", f"{self.duplicates} result(s) that came twice, dropped"))
        rows.append(("dead letters", f"{self.dead_letters} call(s) given up (TaskDeadLettered)"))
        width = max(len(k) for k, _ in rows)
        return "mqexec run summary\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def human_bytes(n: float) -> str:
    """``8392704`` → ``8.0 MiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _coffea(output: Any) -> tuple[int | None, int | None]:
    """(events, bytes read) of a coffea Runner's wrapped output: its metrics when Runner saved them, else the
    entry ranges of the processed chunks; (None, None) for anything else."""
    if not (isinstance(output, dict) and "processed" in output):
        return None, None
    metrics = output.get("metrics") or {}
    events = metrics.get("entries")
    if events is None:
        events = sum(c.entrystop - c.entrystart for c in output["processed"] if hasattr(c, "entrystop"))
    read = metrics.get("bytesread")
    return int(events), (int(read) if read is not None else None)


def summarize(
    before: dict[str, Any] | None,
    after: dict[str, Any],
    seconds: float,
    *,
    output: Any = None,
    chunks: int | None = None,
    cache_hits: int = 0,
) -> RunSummary:
    """The summary of what happened between two :meth:`Client.stats` snapshots (``before`` None: since the client
    started); ``output``: a coffea Runner's wrapped output, for events and bytes read."""
    base = before or {"counts": {}, "by_worker": {}, "by_site": {}}
    counts = Counter(after["counts"]) - Counter(base["counts"])
    by_worker = Counter(after["by_worker"]) - Counter(base["by_worker"])
    by_site = Counter(after["by_site"]) - Counter(base["by_site"])
    events, read = _coffea(output)
    return RunSummary(
        seconds=seconds,
        tasks=sum(by_worker.values()),
        chunks=chunks,
        events=events,
        bytes_read=read,
        cache_hits=cache_hits + counts["cache_hits"],
        resent=counts["resent"],
        lost=counts["lost"],
        lapsed=counts["lapsed"],
        duplicates=counts["duplicates"],
        dead_letters=counts["dead"],
        by_worker=dict(by_worker),
        by_site=dict(by_site),
    )


class Run:
    """A run of a client, from now until :meth:`finish`: ``Run(client) ... run.finish(show=True)``."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.before = client.stats()
        self.started = time.monotonic()

    def finish(
        self, output: Any = None, *, chunks: int | None = None, cache_hits: int = 0, show: bool = True
    ) -> RunSummary:
        """The run's :class:`RunSummary` (also kept for :func:`last`); logged in one INFO line, and printed as a
        block on stderr if ``show``."""
        global _last
        summary = summarize(
            self.before,
            self.client.stats(),
            time.monotonic() - self.started,
            output=output,
            chunks=chunks,
            cache_hits=cache_hits,
        )
        _last = summary
        log.info("run summary: %s", summary.line())
        if show:
            print(summary.text(), file=sys.stderr, flush=True)
        return summary


def last() -> RunSummary | None:
    """The summary of the last run that finished in this process (an MQExecutor run, or a client closed with a
    summary): ``mqexec.summary.last().to_json()``."""
    return _last
