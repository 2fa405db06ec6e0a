"""Missing transverse momentum (``MET_*``): minus the vector sum of the visible objects, plus resolution."""

from __future__ import annotations

import numpy as np

from .jets import RecoJets
from .leptons import PromptReco


def _px_py(event: np.ndarray, pt: np.ndarray, phi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.bincount(event, pt * np.cos(phi), minlength=n), np.bincount(event, pt * np.sin(phi), minlength=n)


def met_columns(rng: np.random.Generator, jets: RecoJets, prompt: PromptReco, n: int) -> dict[str, np.ndarray]:
    """``MET_pt``, ``MET_phi``, ``MET_sumEt`` of ``n`` events from the jets and the reconstructed prompt
    leptons (non-prompt leptons sit inside jets and are counted with them)."""
    jx, jy = _px_py(jets.event, jets.pt, jets.phi, n)
    met_x = -jx + rng.normal(0, 12.0, n)
    met_y = -jy + rng.normal(0, 12.0, n)
    reco, event = prompt.reco, prompt.truth.event
    met_x -= np.bincount(event[reco], (prompt.pt * np.cos(prompt.truth.phi))[reco], minlength=n)
    met_y -= np.bincount(event[reco], (prompt.pt * np.sin(prompt.truth.phi))[reco], minlength=n)
    sum_et = np.bincount(jets.event, jets.pt, minlength=n) + np.bincount(event[reco], prompt.pt[reco], minlength=n)
    return {
        "MET_pt": np.hypot(met_x, met_y).astype(np.float32),
        "MET_phi": np.arctan2(met_y, met_x).astype(np.float32),
        "MET_sumEt": sum_et.astype(np.float32),
    }
