"""Reconstructed jets (``Jet``): detector response on the truth jets, pileup jets, b-tagging.

```
truth Jets + their GenJet index -> response, pileup jets, > 15 GeV & |eta| < 4.7, b-tag -> RecoJets (flat)
RecoJets + jet -> lepton indices -> Jet collection (pT-sorted)
```
"""

from __future__ import annotations

from dataclasses import dataclass

import awkward as ak
import numpy as np

from .arrays import I4, collection, offsets, pareto, repeat_events, sort_in_events
from .truthjets import Jets


@dataclass(frozen=True)
class RecoJets(Jets):
    """Flat reconstructed jets of a block (generation order), their reconstruction-level columns, and where
    each lands in the pT-sorted ``Jet``: ``order`` permutes the flat arrays into the written order, ``counts``
    per event, ``local[k]`` is jet ``k``'s index within its event, ``offsets`` the start of each event's jets
    (plus the total)."""

    genjet: np.ndarray
    jet_id: np.ndarray
    btag: np.ndarray
    deepflav: np.ndarray
    order: np.ndarray
    counts: np.ndarray
    local: np.ndarray
    offsets: np.ndarray


def _btag_csvv2(rng: np.random.Generator, hadron_flavour: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """CSVv2-like discriminant: ~60% of b-jets, ~35% of c-jets, ~8% of light jets above 0.5.

    Jets outside the tracker (|eta| > 2.5) get the NanoAOD default of -10."""
    # Beta(a, 1) is above 0.5 with probability 1 - 0.5**a; Beta(1, b) with 0.5**b
    a = np.where(hadron_flavour == 5, 1.32, 1.0)
    b = np.select([hadron_flavour == 5, hadron_flavour == 4], [1.0, 1.5], 3.6)
    value = rng.beta(a, b, size=len(hadron_flavour))
    return np.where(np.abs(eta) > 2.5, -10.0, value)


def reconstruct(rng: np.random.Generator, truth: Jets, genjet_of_truth: np.ndarray, npvs: np.ndarray) -> RecoJets:
    """Smear the truth jets, add pileup jets (more with more primary vertices ``npvs``), keep those above
    15 GeV within |eta| < 4.7 and b-tag them."""
    n = len(npvs)
    k_t = len(truth.event)
    response = rng.normal(1.0, 0.12, k_t) * (1.0 - 0.1 * np.exp(-truth.pt / 40.0))
    pu_event = repeat_events(rng.poisson(0.12 * npvs)).astype(np.int64)
    k_pu = len(pu_event)
    event = np.concatenate([truth.event, pu_event])
    pt = np.concatenate([truth.pt * response, pareto(rng, 14.0, 4.0, k_pu)])
    eta = np.concatenate([truth.eta + rng.normal(0, 0.02, k_t), rng.uniform(-4.7, 4.7, k_pu)])
    phi = np.concatenate([truth.phi + rng.normal(0, 0.02, k_t), rng.uniform(-np.pi, np.pi, k_pu)])
    mass = np.concatenate([truth.mass * response, np.zeros(k_pu)])
    mass[k_t:] = pt[k_t:] * rng.uniform(0.08, 0.25, k_pu)
    hflav = np.concatenate([truth.hadron_flavour, np.zeros(k_pu, dtype=I4)])
    pflav = np.concatenate([truth.parton_flavour, np.zeros(k_pu, dtype=I4)])
    genjet = np.concatenate([genjet_of_truth, np.full(k_pu, -1, dtype=I4)])
    jet_id = np.concatenate(
        [
            rng.choice(np.array([6, 2, 0], dtype=I4), size=k_t, p=[0.95, 0.03, 0.02]),
            rng.choice(np.array([6, 2, 0], dtype=I4), size=k_pu, p=[0.80, 0.08, 0.12]),
        ]
    )
    keep = (pt > 15.0) & (np.abs(eta) < 4.7)
    phi = (phi + np.pi) % (2 * np.pi) - np.pi
    event, pt, eta, phi, mass = (a[keep] for a in (event, pt, eta, phi, mass))
    hflav, pflav, genjet, jet_id = (a[keep] for a in (hflav, pflav, genjet, jet_id))
    btag = _btag_csvv2(rng, hflav, eta)
    deepflav = np.clip(btag * rng.normal(1.0, 0.1, len(btag)), 0.0, 1.0)
    deepflav = np.where(btag < 0, -1.0, deepflav)
    order, counts, local = sort_in_events(event, pt, n)
    return RecoJets(
        event=event,
        pt=pt,
        eta=eta,
        phi=phi,
        mass=mass,
        hadron_flavour=hflav,
        parton_flavour=pflav,
        genjet=genjet,
        jet_id=jet_id,
        btag=btag,
        deepflav=deepflav,
        order=order,
        counts=counts,
        local=local,
        offsets=offsets(counts),
    )


def jet_collection(rng: np.random.Generator, jets: RecoJets, lepton_refs: dict[str, np.ndarray]) -> ak.Array:
    """The ``Jet`` collection; ``lepton_refs`` are per-jet columns already in the written order
    (``muonIdx1`` ... ``nElectrons``). Draws the jet areas."""
    fields = {
        "pt": jets.pt,
        "eta": jets.eta,
        "phi": jets.phi,
        "mass": jets.mass,
        "btagCSVV2": jets.btag,
        "btagDeepFlavB": jets.deepflav,
        "jetId": jets.jet_id,
        "area": np.full(len(jets.pt), 0.5) + rng.normal(0, 0.02, len(jets.pt)),
        "hadronFlavour": jets.hadron_flavour,
        "partonFlavour": jets.parton_flavour,
        "genJetIdx": jets.genjet,
    }
    out = collection(fields, jets.order, jets.counts, {"*": 10, "eta": 12, "phi": 12})
    for name, values in lepton_refs.items():
        out[name] = ak.unflatten(values.astype(I4), jets.counts)
    return out
