"""One block of synthetic NanoAOD events: the collections generated in turn from one random stream.

```
seed, process, block -> rng -> event counts -> truth jets -> GenJet -> Jet (flat) -> prompt leptons
   -> GenPart -> Muon, Electron -> MET -> Jet (collection) -> event columns  ==> {"run": ..., "Jet": ...}
```
The order of the steps is part of the format: every step draws from the same generator, so reordering
them changes every event after it (``tests/test_synthetic.py`` pins the output by hash).
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from . import genpart, jets, leptons, truthjets
from .events import event_columns, event_counts
from .met import met_columns
from .model import FORMAT_VERSION, process_model


def generate_block(
    n_events: int, *, seed: int = 0, process: str = "ttbar", block: int = 0, first_event: int = 1
) -> dict[str, Any]:
    """Generate one block of ``n_events`` synthetic NanoAOD events as a dict of numpy/awkward arrays,
    ready for ``uproot`` (``tree.extend(block)``): collections ``Jet``, ``GenJet``, ``Muon``, ``Electron``,
    ``GenPart`` as awkward records (uproot writes them as ``nJet`` + ``Jet_pt`` ...), ``PV_*``, ``MET_*``
    and the event-level ``run``, ``luminosityBlock``, ``event``, ``genWeight`` as numpy arrays.

    >>> block = generate_block(1000, seed=3, process="wjets")
    >>> int(block["event"][0]), len(block["Jet"])
    (1, 1000)
    """
    model = process_model(process)
    ss = np.random.SeedSequence([int(seed), zlib.crc32(process.encode()), int(block), FORMAT_VERSION])
    rng = np.random.default_rng(ss)
    n = int(n_events)

    n_lep_true, npvs = event_counts(rng, model, n)
    truth = truthjets.generate(rng, process, model, n_lep_true)
    genjet, genjet_of_truth = truthjets.genjets(truth, n)
    reco_jets = jets.reconstruct(rng, truth, genjet_of_truth, npvs)
    prompt = leptons.prompt_truth(rng, model, n_lep_true)
    gen = genpart.generate(rng, model, n_lep_true, prompt)
    leps = leptons.reconstruct(rng, prompt, gen.lepton_charge, gen.lepton_index, reco_jets)
    met = met_columns(rng, reco_jets, leps.prompt, n)
    jet = jets.jet_collection(rng, reco_jets, leps.jet_refs)
    return {
        **event_columns(rng, model, npvs, block=int(block), first_event=first_event),
        **met,
        "Jet": jet,
        "GenJet": genjet,
        "Muon": leps.muons,
        "Electron": leps.electrons,
        "GenPart": gen.collection,
    }
