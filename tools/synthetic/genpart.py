"""The generator record (``GenPart``): the tops, the W bosons that decay to leptons, and those leptons.

```
events' n_lep_true + PromptTruth (lepton kinematics) -> tops | W+/W- | leptons, per event, generation order
                                                      -> GenPart, and each prompt lepton's charge and index
```
NanoAOD keeps GenPart in generation order (not pT order), mothers before daughters.
"""

from __future__ import annotations

from dataclasses import dataclass

import awkward as ak
import numpy as np

from .arrays import I4, collection, offsets, repeat_events, signs
from .leptons import PromptTruth
from .model import ProcessModel

# NanoAOD GenPart.statusFlags bits (isPrompt=0, isHardProcess=7, fromHardProcess=8, isFirstCopy=12,
# isLastCopy=13)
_FLAGS_HARD = (1 << 0) | (1 << 7) | (1 << 8) | (1 << 12) | (1 << 13)
_FLAGS_LEPTON = (1 << 0) | (1 << 8) | (1 << 12) | (1 << 13)


@dataclass(frozen=True)
class GenParticles:
    """``GenPart`` of a block, and for each prompt lepton (flat, in :class:`PromptTruth` order) its charge
    and its index within its event's GenPart (what ``Muon.genPartIdx`` points at)."""

    collection: ak.Array
    lepton_charge: np.ndarray
    lepton_index: np.ndarray


def generate(
    rng: np.random.Generator, model: ProcessModel, n_lep_true: np.ndarray, leptons: PromptTruth
) -> GenParticles:
    """GenPart per event: ``model.tops`` tops (ttbar: t and tbar; single top: t), then the leptonic Ws,
    then their leptons. The two leptons of a dileptonic ttbar event have opposite charges."""
    n = len(n_lep_true)
    n_tops = model.tops
    k_p = len(leptons.event)
    top_counts = np.full(n, n_tops)
    counts = top_counts + 2 * n_lep_true
    gp_offsets = offsets(counts)
    top_event = repeat_events(top_counts).astype(np.int64)
    top_slot = np.arange(len(top_event)) - offsets(top_counts)[top_event]
    lep_slot = np.arange(k_p) - offsets(n_lep_true)[leptons.event]
    # opposite charges for the two leptons of a dileptonic ttbar event (one from t, one from tbar)
    ev_sign = signs(rng, n)
    charge = (ev_sign[leptons.event] * np.where(lep_slot == 0, 1, -1)).astype(I4)
    w_local = n_tops + lep_slot
    l_local = n_tops + n_lep_true[leptons.event] + lep_slot
    total = int(gp_offsets[-1])
    pt = np.empty(total)
    eta = np.empty(total)
    phi = np.empty(total)
    mass = np.empty(total)
    pdg = np.empty(total, dtype=I4)
    status = np.empty(total, dtype=I4)
    flags = np.empty(total, dtype=I4)
    mother = np.empty(total, dtype=I4)

    ti = gp_offsets[top_event] + top_slot
    pt[ti] = rng.gamma(2.0, 50.0, len(ti))
    eta[ti] = rng.normal(0, 1.5, len(ti))
    phi[ti] = rng.uniform(-np.pi, np.pi, len(ti))
    mass[ti] = 172.5
    pdg[ti] = np.where(top_slot == 0, 6, -6) if n_tops == 2 else 6 * ev_sign[top_event]
    status[ti] = 62
    flags[ti] = _FLAGS_HARD
    mother[ti] = -1

    wi = gp_offsets[leptons.event] + w_local
    pt[wi] = leptons.pt * rng.uniform(0.8, 1.6, k_p)
    eta[wi] = leptons.eta * rng.uniform(0.5, 1.0, k_p)
    phi[wi] = leptons.phi
    mass[wi] = 80.4
    pdg[wi] = 24 * charge
    status[wi] = 62
    flags[wi] = _FLAGS_HARD
    # the W's mother is the top of the same charge sign (t -> W+ b), if there are tops
    if n_tops == 2:
        mother[wi] = np.where(charge > 0, 0, 1)
    elif n_tops == 1:
        mother[wi] = 0
    else:
        mother[wi] = -1

    li = gp_offsets[leptons.event] + l_local
    pt[li] = leptons.pt
    eta[li] = leptons.eta
    phi[li] = leptons.phi
    mass[li] = np.where(leptons.is_mu, 0.10566, 0.000511)
    pdg[li] = np.where(leptons.is_mu, 13, 11) * -charge  # l+ has a negative PDG id
    status[li] = 1
    flags[li] = _FLAGS_LEPTON
    mother[li] = w_local

    fields = {
        "pt": pt,
        "eta": eta,
        "phi": phi,
        "mass": mass,
        "pdgId": pdg,
        "status": status,
        "statusFlags": flags,
        "genPartIdxMother": mother,
    }
    # generation order, not pT order, as in NanoAOD
    genpart = collection(fields, np.arange(total), counts, {"*": 8})
    return GenParticles(collection=genpart, lepton_charge=charge, lepton_index=l_local)
