"""Synthetic, seeded CMS NanoAOD-like files for tests, benchmarks and the demo.

Tooling, not part of mqexec: it lives in ``tools/`` (pytest puts ``tools/`` on the import path; scripts add
it themselves) and needs the ``coffea`` extra (numpy, awkward, uproot). It writes ROOT files that coffea's
``NanoAODSchema`` opens cleanly and that the AGC CMS ttbar selection (exactly one tight lepton, >= 4 jets,
>= 1 b-tag) acts on sensibly.

It is a *toy*, not an event generator: every object's kinematics are sampled from plausible marginal
distributions (falling jet pT spectra, b-tag discriminants that depend on the jet flavour, isolated prompt
leptons from W decays plus non-isolated leptons inside jets), without momentum conservation or decays.
One module per collection (``truthjets``: truth jets and GenJet; ``jets``: Jet; ``leptons``: Muon and
Electron; ``genpart``: GenPart; ``met``; ``events``: event-level columns), put together by ``block``;
``files`` writes them to ROOT.

Quick start::

    >>> from synthetic import write_nanoaod, make_fileset
    >>> write_nanoaod("/tmp/ttbar.root", 10_000, seed=1, process="ttbar")  # doctest: +SKIP
    PosixPath('/tmp/ttbar.root')
    >>> fileset = make_fileset("/tmp/agc", n_files=2, events_per_file=50_000)  # doctest: +SKIP
    >>> sorted(fileset)  # doctest: +SKIP
    ['single_top_t_chan__nominal', 'ttbar__nominal', 'wjets__nominal']

or from a shell: ``PYTHONPATH=tools python -m synthetic /tmp/agc --files 8 --events 125000``.

Files are identical in content for the same ``(n_events, seed, process, first_event)``: events are generated
in fixed blocks of :data:`BLOCK_SIZE` entries, each from its own ``numpy.random.SeedSequence`` keyed by the
seed, the process and the block number, and each block is written as one ROOT basket (so writing a 1M-event
file holds only one block in memory).
"""

from .block import generate_block
from .files import make_fileset, write_nanoaod
from .model import BLOCK_SIZE, FORMAT_VERSION, PROCESSES, ProcessModel

__all__ = [
    "BLOCK_SIZE",
    "FORMAT_VERSION",
    "PROCESSES",
    "ProcessModel",
    "generate_block",
    "make_fileset",
    "write_nanoaod",
]
