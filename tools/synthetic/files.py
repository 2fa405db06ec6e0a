"""ROOT files of synthetic events, and AGC-style filesets of them (written once, reused while unchanged).

```
(n_events, seed, process, first_event) -> generate_block per BLOCK_SIZE -> one basket each -> file.root
make_fileset: per process, n_files such files (distinct seeds and event numbers) -> coffea fileset dict
```
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .block import generate_block
from .model import BLOCK_SIZE, FORMAT_VERSION, PROCESSES, process_model

#: Name of the TObjString written next to ``Events`` that records how the file was made (cache key).
#: It and the ``generator`` value below name the file format (first written by ``mqexec.synthetic``, the
#: module this package replaced with identical content), so files cached before the move stay valid.
PROVENANCE_KEY = "mqexec_synthetic"
_GENERATOR = "mqexec.synthetic"


def _provenance(n_events: int, seed: int, process: str, first_event: int) -> str:
    return json.dumps(
        {
            "generator": _GENERATOR,
            "format_version": FORMAT_VERSION,
            "block_size": BLOCK_SIZE,
            "n_events": int(n_events),
            "seed": int(seed),
            "process": process,
            "first_event": int(first_event),
        },
        sort_keys=True,
    )


def _compression() -> Any:
    import uproot

    try:
        import lz4  # noqa: F401  (uproot's LZ4 codec needs it)
    except ImportError:  # pragma: no cover - lz4 comes with the coffea extra
        return uproot.ZLIB(1)
    return uproot.LZ4(1)


def write_nanoaod(
    path: str | os.PathLike[str], n_events: int, *, seed: int = 0, process: str = "ttbar", first_event: int = 1
) -> Path:
    """Write ``n_events`` synthetic NanoAOD events of ``process`` to the ROOT file ``path`` (tree
    ``Events``) and return its path.

    The content depends only on ``(n_events, seed, process, first_event)``; ``first_event`` is the
    ``event`` number of the first entry (so files of one dataset can carry distinct event numbers).
    Events are written in blocks of :data:`BLOCK_SIZE` (one basket each), so memory stays flat for
    millions of events. The file is written under a temporary name and renamed when complete, and carries a
    ``mqexec_synthetic`` TObjString (JSON) that records how it was made.

    >>> from synthetic import write_nanoaod
    >>> write_nanoaod("/tmp/ttbar.root", 20_000, seed=7, process="ttbar")  # doctest: +SKIP
    PosixPath('/tmp/ttbar.root')
    >>> from coffea.nanoevents import NanoEventsFactory, NanoAODSchema  # doctest: +SKIP
    >>> events = NanoEventsFactory.from_root({"/tmp/ttbar.root": "Events"}, schemaclass=NanoAODSchema,
    ...                                      mode="eager").events()  # doctest: +SKIP
    """
    import uproot

    process_model(process)
    n_events = int(n_events)
    if n_events <= 0:
        raise ValueError("n_events must be positive")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with uproot.recreate(tmp, compression=_compression()) as f:
            tree = None
            for block, start in enumerate(range(0, n_events, BLOCK_SIZE)):
                data = generate_block(
                    min(BLOCK_SIZE, n_events - start), seed=seed, process=process, block=block, first_event=first_event
                )
                if tree is None:
                    # mktree, not f["Events"] = ...: since uproot 5.7 assignment writes an RNTuple
                    n_blocks = -(-n_events // BLOCK_SIZE)
                    tree = f.mktree("Events", data, initial_basket_capacity=n_blocks + 1)
                else:
                    tree.extend(data)
            f[PROVENANCE_KEY] = _provenance(n_events, seed, process, first_event)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _is_cached(path: Path, provenance: str) -> bool:
    """True if ``path`` is a complete synthetic file written with exactly these parameters."""
    if not path.is_file():
        return False
    import uproot

    try:
        with uproot.open(path) as f:
            if PROVENANCE_KEY not in f or str(f[PROVENANCE_KEY]) != provenance:
                return False
            expected = json.loads(provenance)["n_events"]
            return bool(f["Events"].num_entries == expected)
    except Exception:  # unreadable, truncated, not ROOT: rewrite it
        return False


def _file_seed(seed: int, process: str, index: int) -> int:
    """A per-file seed, distinct for every (seed, process, file index)."""
    state = np.random.SeedSequence([int(seed), zlib.crc32(process.encode()), int(index)]).generate_state(
        1, dtype=np.uint32
    )
    return int(state[0])


def make_fileset(
    directory: str | os.PathLike[str],
    *,
    n_files: int = 8,
    events_per_file: int = 125_000,
    processes: Iterable[str] = ("ttbar", "wjets", "single_top_t_chan"),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Write (or reuse) ``n_files`` files of ``events_per_file`` events *per process* into ``directory``
    and return a coffea fileset, AGC style::

        {"ttbar__nominal": {"files": {"/dir/ttbar__nominal_000.root": "Events", ...},
                            "metadata": {"process": "ttbar", "variation": "nominal",
                                         "nevts": n_files * events_per_file, "xsec": 729.84}},
         ...}

    Files that already exist with the same parameters (entries, seed, process, format version; recorded in
    the file) are reused, so calling this twice costs one ``uproot.open`` per file the second time.

    >>> from synthetic import make_fileset
    >>> fileset = make_fileset("/tmp/agc", n_files=2, events_per_file=10_000, processes=("ttbar",))
    ... # doctest: +SKIP
    >>> fileset["ttbar__nominal"]["metadata"]["nevts"]  # doctest: +SKIP
    20000
    """
    directory = Path(directory)
    n_files, events_per_file = int(n_files), int(events_per_file)
    if n_files <= 0 or events_per_file <= 0:
        raise ValueError("n_files and events_per_file must be positive")
    processes = tuple(processes)
    for process in processes:
        process_model(process)
    fileset = {}
    for process in processes:
        dataset = f"{process}__nominal"
        files = {}
        for i in range(n_files):
            path = (directory / f"{dataset}_{i:03d}.root").resolve()
            file_seed = _file_seed(seed, process, i)
            first_event = 1 + i * events_per_file
            if not _is_cached(path, _provenance(events_per_file, file_seed, process, first_event)):
                write_nanoaod(path, events_per_file, seed=file_seed, process=process, first_event=first_event)
            files[str(path)] = "Events"
        fileset[dataset] = {
            "files": files,
            "metadata": {
                "process": process,
                "variation": "nominal",
                "nevts": n_files * events_per_file,
                "xsec": PROCESSES[process].xsec,
            },
        }
    return fileset
