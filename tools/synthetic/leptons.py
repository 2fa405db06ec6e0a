"""Leptons: the prompt ones from W decays (isolated, well measured) and non-prompt ones inside jets
(heavy-flavour decays, fakes: not isolated, displaced), written as the ``Muon`` and ``Electron`` collections.

```
n_lep_true -> PromptTruth ---------------(GenPart gives charge, index)--> PromptReco --+
RecoJets ---------------------------------------------------------------> NonPrompt --+-> Muon, Electron
                                                                       (pT-sorted) + jet -> lepton indices
```
"""

from __future__ import annotations

from dataclasses import dataclass

import awkward as ak
import numpy as np

from .arrays import I4, collection, first_two_per_target, offsets, repeat_events, signs, sort_in_events
from .jets import RecoJets
from .model import ProcessModel

_LEPTON_PRECISION = {"*": 10, "pt": 23, "eta": 12, "phi": 12}
_CUT_BASED = np.array([0, 1, 2, 3, 4], dtype=I4)


@dataclass(frozen=True)
class PromptTruth:
    """Generated prompt leptons of a block, flat, ``n_lep_true[e]`` for event ``e``: muon or electron,
    true pT, eta, phi."""

    event: np.ndarray
    is_mu: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray


@dataclass(frozen=True)
class PromptReco:
    """The prompt leptons after the detector (same order as :class:`PromptTruth`): ``reco`` says which
    were reconstructed; measured ``pt``; the isolation, impact parameter and identification they get."""

    truth: PromptTruth
    charge: np.ndarray
    gen_index: np.ndarray
    reco: np.ndarray
    pt: np.ndarray
    iso: np.ndarray
    sip: np.ndarray
    tight: np.ndarray
    cut: np.ndarray


@dataclass(frozen=True)
class _NonPrompt:
    """Leptons inside jets, flat: ``jet`` is the index of their jet in the flat :class:`RecoJets` arrays."""

    event: np.ndarray
    jet: np.ndarray
    is_mu: np.ndarray
    reco: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    iso: np.ndarray
    sip: np.ndarray
    tight: np.ndarray
    cut: np.ndarray
    flav: np.ndarray


@dataclass(frozen=True)
class Leptons:
    """``Muon`` and ``Electron`` of a block, the ``Jet`` columns that point at them (``muonIdx1`` ...
    ``nElectrons``, in the written jet order) and the prompt leptons (for MET)."""

    muons: ak.Array
    electrons: ak.Array
    jet_refs: dict[str, np.ndarray]
    prompt: PromptReco


def prompt_truth(rng: np.random.Generator, model: ProcessModel, n_lep_true: np.ndarray) -> PromptTruth:
    """``n_lep_true`` prompt leptons per event, half of them muons."""
    event = repeat_events(n_lep_true).astype(np.int64)
    k = len(event)
    is_mu = rng.random(k) < 0.5
    pt = 8.0 + rng.gamma(2.2, model.lepton_pt_scale, k)
    return PromptTruth(event=event, is_mu=is_mu, pt=pt, eta=rng.normal(0, 1.2, k), phi=rng.uniform(-np.pi, np.pi, k))


def _reconstruct_prompt(
    rng: np.random.Generator, truth: PromptTruth, charge: np.ndarray, gen_index: np.ndarray
) -> PromptReco:
    k = len(truth.event)
    p_eff = np.where(truth.is_mu, 0.95, 0.88)
    reco = (rng.random(k) < p_eff) & (np.abs(truth.eta) < np.where(truth.is_mu, 2.4, 2.5))
    pt = truth.pt * rng.normal(1.0, np.where(truth.is_mu, 0.02, 0.03))
    reco &= pt > np.where(truth.is_mu, 3.0, 5.0)
    return PromptReco(
        truth=truth,
        charge=charge,
        gen_index=gen_index,
        reco=reco,
        pt=pt,
        iso=rng.exponential(0.035, k),
        sip=np.abs(rng.normal(0, 1.3, k)),
        tight=rng.random(k) < 0.96,
        cut=rng.choice(_CUT_BASED, size=k, p=[0.01, 0.03, 0.06, 0.15, 0.75]),
    )


def _non_prompt(rng: np.random.Generator, jets: RecoJets) -> _NonPrompt:
    n_jets = jets.counts
    event = repeat_events(rng.poisson(np.where(n_jets > 0, 0.15 * n_jets, 0.0))).astype(np.int64)
    k = len(event)
    local = (rng.random(k) * n_jets[event]).astype(np.int64)
    jet = jets.order[jets.offsets[event] + local]  # index into the flat (unsorted) jet arrays
    is_mu = rng.random(k) < 0.5
    pt = jets.pt[jet] * rng.beta(1.3, 5.0, k)
    eta = jets.eta[jet] + rng.normal(0, 0.08, k)
    phi = jets.phi[jet] + rng.normal(0, 0.08, k)
    hf = jets.hadron_flavour[jet]
    return _NonPrompt(
        event=event,
        jet=jet,
        is_mu=is_mu,
        reco=(pt > np.where(is_mu, 3.0, 5.0)) & (np.abs(eta) < np.where(is_mu, 2.4, 2.5)),
        pt=pt,
        eta=eta,
        phi=phi,
        iso=0.05 + rng.exponential(0.6, k),
        sip=rng.exponential(5.0, k),
        tight=rng.random(k) < 0.6,
        cut=rng.choice(_CUT_BASED, size=k, p=[0.4, 0.25, 0.15, 0.1, 0.1]),
        flav=np.select([hf == 5, hf == 4], [5, 4], 3).astype(np.uint8),
    )


def _flavour(
    rng: np.random.Generator, is_mu: bool, p: PromptReco, np_: _NonPrompt, jets: RecoJets
) -> tuple[ak.Array, dict[str, np.ndarray]]:
    """The ``Muon`` (``is_mu``) or ``Electron`` collection, and the jet -> lepton columns it implies."""
    sel_p = p.reco & (p.truth.is_mu == is_mu)
    sel_np = np_.reco & (np_.is_mu == is_mu)
    ev = np.concatenate([p.truth.event[sel_p], np_.event[sel_np]])
    k1, k2 = int(sel_p.sum()), int(sel_np.sum())
    k = k1 + k2
    pt = np.concatenate([p.pt[sel_p], np_.pt[sel_np]])
    eta = np.concatenate([p.truth.eta[sel_p] + rng.normal(0, 0.002, k1), np_.eta[sel_np]])
    phi = np.concatenate([p.truth.phi[sel_p] + rng.normal(0, 0.002, k1), np_.phi[sel_np]])
    phi = (phi + np.pi) % (2 * np.pi) - np.pi
    charge = np.concatenate([p.charge[sel_p], signs(rng, k2).astype(I4)])
    iso03 = np.concatenate([p.iso[sel_p], np_.iso[sel_np]])
    iso04 = iso03 * rng.uniform(1.0, 1.4, k)
    sip = np.concatenate([p.sip[sel_p], np_.sip[sel_np]])
    dxy = rng.normal(0, 1, k) * np.where(np.arange(k) < k1, 0.002, 0.02)
    dz = rng.normal(0, 1, k) * np.where(np.arange(k) < k1, 0.004, 0.04)
    jet_flat = np.concatenate([np.full(k1, -1), np_.jet[sel_np]])
    jet_local = np.where(jet_flat >= 0, jets.local[np.maximum(jet_flat, 0)], -1).astype(I4)
    fields = {
        "pt": pt,
        "eta": eta,
        "phi": phi,
        "mass": np.full(k, 0.10566 if is_mu else 0.000511),
        "charge": charge,
        "pdgId": (np.int32(13 if is_mu else 11) * -charge).astype(I4),
        "pfRelIso03_all": iso03,
        "pfRelIso04_all": iso04,
        "sip3d": sip,
        "dxy": dxy,
        "dz": dz,
        "jetIdx": jet_local,
        "genPartIdx": np.concatenate([p.gen_index[sel_p], np.full(k2, -1)]).astype(I4),
        "genPartFlav": np.concatenate([np.ones(k1, dtype=np.uint8), np_.flav[sel_np]]),
    }
    if is_mu:
        tight = np.concatenate([p.tight[sel_p], np_.tight[sel_np]])
        fields["tightId"] = tight
        fields["mediumId"] = tight | (rng.random(k) < 0.5)
        fields["looseId"] = np.ones(k, dtype=bool)
        fields["isGlobal"] = fields["looseId"] & (rng.random(k) < 0.97)
        fields["isTracker"] = np.ones(k, dtype=bool)
        fields["isPFcand"] = np.ones(k, dtype=bool)
    else:
        cut = np.concatenate([p.cut[sel_p], np_.cut[sel_np]])
        fields["cutBased"] = cut
        fields["mvaFall17V2Iso_WP90"] = cut >= 3
        fields["mvaFall17V2Iso_WP80"] = (cut >= 4) & (rng.random(k) < 0.9)
        fields["convVeto"] = rng.random(k) < 0.97
    order, counts, _ = sort_in_events(ev, pt, len(jets.counts))
    # Jet -> lepton cross references, in the written (sorted) order of both collections
    jet_global = np.where(jet_local >= 0, jets.offsets[ev] + jet_local, -1)
    local_sorted = np.arange(len(order)) - np.repeat(offsets(counts)[:-1], counts)
    idx1, idx2, n_in_jet = first_two_per_target(int(jets.offsets[-1]), jet_global[order], local_sorted)
    name = "muon" if is_mu else "electron"
    refs = {f"{name}Idx1": idx1, f"{name}Idx2": idx2, f"n{name.capitalize()}s": n_in_jet}
    return collection(fields, order, counts, _LEPTON_PRECISION), refs


def reconstruct(
    rng: np.random.Generator, truth: PromptTruth, charge: np.ndarray, gen_index: np.ndarray, jets: RecoJets
) -> Leptons:
    """Reconstruct the prompt leptons (``charge`` and GenPart ``gen_index`` from the generator record), add
    the non-prompt ones inside ``jets`` and write both as ``Muon`` and ``Electron``."""
    prompt = _reconstruct_prompt(rng, truth, charge, gen_index)
    non_prompt = _non_prompt(rng, jets)
    muons, mu_refs = _flavour(rng, True, prompt, non_prompt, jets)
    electrons, el_refs = _flavour(rng, False, prompt, non_prompt, jets)
    order = ("muonIdx1", "muonIdx2", "electronIdx1", "electronIdx2", "nMuons", "nElectrons")
    refs = {**mu_refs, **el_refs}
    return Leptons(muons=muons, electrons=electrons, jet_refs={k: refs[k] for k in order}, prompt=prompt)
