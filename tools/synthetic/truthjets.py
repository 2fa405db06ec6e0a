"""Truth-level jets (the partons' jets: hard process + radiation) and the ``GenJet`` collection made of them.

```
process -> hard jets (top b-jets, W daughters, the t-channel forward jet ...) + radiation jets
        -> Jets (flat, unsorted)  -> GenJet (> 10 GeV, |eta| < 5, pT-sorted) and its index per truth jet
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import awkward as ak
import numpy as np

from .arrays import I4, collection, pareto, repeat_events, signs, sort_in_events
from .model import ProcessModel

#: One group of jets: (event index, pt, eta, hadronFlavour, partonFlavour), flat.
_Jets = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Jets:
    """Flat jets of a block, one entry per jet: event index, kinematics, flavour (truth jets: unsorted)."""

    event: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    mass: np.ndarray
    hadron_flavour: np.ndarray
    parton_flavour: np.ndarray


def _b_jets(rng: np.random.Generator, counts: np.ndarray, pt_scale: float) -> _Jets:
    """The b-jets of top decays: a gamma pT spectrum, central."""
    ev = repeat_events(counts)
    k = len(ev)
    return ev, rng.gamma(3.0, pt_scale, k), rng.normal(0, 1.2, k), np.full(k, 5), 5 * signs(rng, k)


def _w_jets(rng: np.random.Generator, counts: np.ndarray) -> _Jets:
    """The two jets of each hadronic W: W -> ud or cs, so half of the pairs carry a charm quark."""
    ev = repeat_events(counts)
    k = len(ev)
    h = np.where(rng.random(k) < 0.25, 4, 0)
    pt, eta = rng.gamma(2.6, 20.0, k), rng.normal(0, 1.3, k)
    partons = np.where(h == 4, 4, rng.integers(1, 4, size=k)) * signs(rng, k)
    return ev, pt, eta, h, partons


def _ttbar(rng: np.random.Generator, n_lep_true: np.ndarray) -> list[_Jets]:
    """Two top b-jets; the W daughters of each top whose W did not decay to a lepton."""
    return [_b_jets(rng, np.full(len(n_lep_true), 2), 22.0), _w_jets(rng, 2 * (2 - n_lep_true))]


def _single_top_t_chan(rng: np.random.Generator, n_lep_true: np.ndarray) -> list[_Jets]:
    """The top's b-jet, the forward light-quark jet, the soft spectator b, the W daughters if hadronic."""
    n = len(n_lep_true)
    top_b = _b_jets(rng, np.ones(n, dtype=int), 20.0)
    # the forward light-quark jet that makes t-channel single top recognisable
    ev = repeat_events(np.ones(n, dtype=int))
    k = len(ev)
    pt = rng.gamma(2.5, 25.0, k)
    eta = signs(rng, k) * np.abs(rng.normal(2.2, 0.9, k))
    forward = (ev, pt, eta, np.zeros(k, dtype=int), rng.integers(1, 4, k) * signs(rng, k))
    # the spectator b of the 4-flavour scheme: soft and often lost
    ev = repeat_events((rng.random(n) < 0.5).astype(int))
    k = len(ev)
    spectator = (ev, pareto(rng, 12.0, 3.0, k), rng.normal(0, 1.8, k), np.full(k, 5), 5 * signs(rng, k))
    return [top_b, forward, spectator, _w_jets(rng, 2 * (n_lep_true == 0))]


#: The hard-process jets of each process (W+jets has none: its jets are all radiation).
_HARD_JETS: dict[str, Callable[[np.random.Generator, np.ndarray], list[_Jets]]] = {
    "ttbar": _ttbar,
    "single_top_t_chan": _single_top_t_chan,
    "wjets": lambda rng, n_lep_true: [],
}


def _radiation_jets(rng: np.random.Generator, model: ProcessModel, n: int) -> _Jets:
    """Initial-state radiation / associated jets for every process: a falling spectrum and a geometric
    multiplicity (each extra jet costs a constant factor: staircase scaling)."""
    n_isr = rng.geometric(1.0 / (1.0 + model.isr_mean), size=n) - 1
    ev = repeat_events(n_isr)
    k = len(ev)
    u = rng.random(k)
    h = np.select([u < model.b_isr_frac, u < model.b_isr_frac + 0.04], [5, 4], 0)
    p = np.where(h > 0, h * signs(rng, k), np.where(rng.random(k) < 0.65, 21, rng.integers(1, 4, k) * signs(rng, k)))
    return ev, pareto(rng, 15.0, 2.0, k), rng.normal(0, 1.8, k), h, p


def generate(rng: np.random.Generator, process: str, model: ProcessModel, n_lep_true: np.ndarray) -> Jets:
    """The truth jets of ``process`` for events with ``n_lep_true`` leptonic W decays each."""
    parts = [*_HARD_JETS[process](rng, n_lep_true), _radiation_jets(rng, model, len(n_lep_true))]
    event = np.concatenate([x[0] for x in parts]).astype(np.int64)
    pt = np.concatenate([x[1] for x in parts])
    return Jets(
        event=event,
        pt=pt,
        eta=np.clip(np.concatenate([x[2] for x in parts]), -6.0, 6.0),
        hadron_flavour=np.concatenate([x[3] for x in parts]).astype(I4),
        parton_flavour=np.concatenate([x[4] for x in parts]).astype(I4),
        phi=rng.uniform(-np.pi, np.pi, len(event)),
        mass=pt * rng.uniform(0.06, 0.20, len(event)),
    )


def genjets(truth: Jets, n_events: int) -> tuple[ak.Array, np.ndarray]:
    """``(GenJet collection, GenJet index of each truth jet or -1)``: truth jets above 10 GeV within
    |eta| < 5, sorted by pT."""
    src = np.flatnonzero((truth.pt > 10.0) & (np.abs(truth.eta) < 5.0))
    order, counts, local = sort_in_events(truth.event[src], truth.pt[src], n_events)
    genjet_of_truth = np.full(len(truth.event), -1, dtype=I4)
    genjet_of_truth[src] = local
    fields = {
        "pt": truth.pt[src],
        "eta": truth.eta[src],
        "phi": truth.phi[src],
        "mass": truth.mass[src],
        "hadronFlavour": truth.hadron_flavour[src].astype(np.uint8),
        "partonFlavour": truth.parton_flavour[src].astype(np.int16),
    }
    return collection(fields, order, counts, {"*": 8}), genjet_of_truth
