"""Event-level columns: run, lumi block, event number, generator weight, primary vertices."""

from __future__ import annotations

import numpy as np

from .arrays import F4, I4
from .model import BLOCK_SIZE, ProcessModel


def event_counts(rng: np.random.Generator, model: ProcessModel, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n_lep_true, npvs)`` per event: how many W bosons decay to a lepton, and the primary vertices."""
    n_lep_true = rng.choice(3, size=n, p=model.lepton_probs)
    npvs = rng.poisson(18.0, size=n).astype(I4) + 1
    return n_lep_true, npvs


def event_columns(
    rng: np.random.Generator, model: ProcessModel, npvs: np.ndarray, *, block: int, first_event: int
) -> dict[str, np.ndarray]:
    """``run``, ``luminosityBlock``, ``event``, ``genWeight``, ``PV_npvs``, ``PV_npvsGood`` of block
    ``block`` (event numbers continue from ``first_event`` across blocks, 1000 events per lumi block)."""
    n = len(npvs)
    start = first_event + block * BLOCK_SIZE
    events = np.arange(start, start + n, dtype=np.uint64)
    gen_weight = np.where(rng.random(n) < model.neg_weight_frac, -1.0, 1.0).astype(F4)
    return {
        "run": np.ones(n, dtype=np.uint32),
        "luminosityBlock": (1 + (events - 1) // 1000).astype(np.uint32),
        "event": events,
        "genWeight": gen_weight,
        "PV_npvs": npvs,
        "PV_npvsGood": np.maximum(npvs - rng.poisson(1.0, n).astype(I4), 1).astype(I4),
    }
