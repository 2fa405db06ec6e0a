"""Synthetic, seeded CMS NanoAOD-like files for tests, benchmarks and demos.

This module is *not* part of the mqexec runtime: nothing in the core imports it. It needs the ``coffea``
extra (numpy, awkward, uproot) and writes ROOT files that coffea's ``NanoAODSchema`` opens cleanly and that
the AGC CMS ttbar selection (exactly one tight lepton, >= 4 jets, >= 1 b-tag) acts on sensibly.

It is a *toy*, not an event generator: every object's kinematics are sampled from plausible marginal
distributions (falling jet pT spectra, b-tag discriminants that depend on the jet flavour, isolated prompt
leptons from W decays plus non-isolated leptons inside jets), without momentum conservation or decays.

Quick start::

    >>> from mqexec.synthetic import write_nanoaod, make_fileset
    >>> write_nanoaod("/tmp/ttbar.root", 10_000, seed=1, process="ttbar")  # doctest: +SKIP
    PosixPath('/tmp/ttbar.root')
    >>> fileset = make_fileset("/tmp/agc", n_files=2, events_per_file=50_000)  # doctest: +SKIP
    >>> sorted(fileset)  # doctest: +SKIP
    ['single_top_t_chan__nominal', 'ttbar__nominal', 'wjets__nominal']

or from a shell: ``python -m mqexec.synthetic /tmp/agc --files 8 --events 125000``.

Files are identical in content for the same ``(n_events, seed, process, first_event)``: events are generated
in fixed blocks of :data:`BLOCK_SIZE` entries, each from its own ``numpy.random.SeedSequence`` keyed by the
seed, the process and the block number, and each block is written as one ROOT basket (so writing a 1M-event
file holds only one block in memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "FORMAT_VERSION",
    "PROCESSES",
    "ProcessModel",
    "generate_block",
    "main",
    "make_fileset",
    "write_nanoaod",
]

#: Entries generated (and written as one basket) at a time. Part of the file format: changing it changes
#: the generated events, so it is folded into :data:`FORMAT_VERSION`.
BLOCK_SIZE = 50_000
#: Bumped whenever the generated content changes; cached files with another version are rewritten.
FORMAT_VERSION = 1
#: Name of the TObjString written next to ``Events`` that records how the file was made (cache key).
PROVENANCE_KEY = "mqexec_synthetic"

#: Integrated luminosity (/pb) of the 2015 CMS Open Data used by the AGC, for cross-section weights.
LUMI_PB = 3378.0


@dataclass(frozen=True)
class ProcessModel:
    """Knobs of the toy model for one physics process.

    ``lepton_probs`` are the probabilities of 0, 1, 2 prompt electrons/muons from W decays; the hard jets
    follow from the process (two top b-jets and the hadronic W daughters for ttbar, ...); ``isr_mean`` is
    the mean number of extra (initial-state radiation) jets above 15 GeV, drawn from a geometric distribution
    (the "staircase scaling" of jet multiplicities) with a power-law pT spectrum; ``b_isr_frac`` is the
    fraction of them that are b-jets (gluon splitting); ``xsec`` is the cross-section in pb used by
    :func:`make_fileset`.
    """

    xsec: float
    lepton_probs: tuple[float, float, float]
    isr_mean: float
    b_isr_frac: float
    neg_weight_frac: float = 0.0


#: The processes of the AGC CMS ttbar fileset that this module can imitate (cross-sections approximate,
#: in pb, as used by the AGC: ttbar NNLO, W(->lnu)+jets, t-channel single top).
PROCESSES: dict[str, ProcessModel] = {
    "ttbar": ProcessModel(xsec=729.84, lepton_probs=(0.50, 0.41, 0.09), isr_mean=1.3, b_isr_frac=0.03),
    "wjets": ProcessModel(
        xsec=15487.16, lepton_probs=(0.33, 0.67, 0.0), isr_mean=0.9, b_isr_frac=0.04, neg_weight_frac=0.15
    ),
    "single_top_t_chan": ProcessModel(xsec=214.2, lepton_probs=(0.67, 0.33, 0.0), isr_mean=1.0, b_isr_frac=0.03),
}

_F4 = np.float32
_I4 = np.int32

# NanoAOD GenPart.statusFlags bits (isPrompt=0, isHardProcess=7, fromHardProcess=8, isFirstCopy=12,
# isLastCopy=13)
_FLAGS_HARD = (1 << 0) | (1 << 7) | (1 << 8) | (1 << 12) | (1 << 13)
_FLAGS_LEPTON = (1 << 0) | (1 << 8) | (1 << 12) | (1 << 13)


# --------------------------------------------------------------------------------------------------------
# small vectorised helpers on "flat objects with an event index"
# --------------------------------------------------------------------------------------------------------
def _repeat_events(counts: np.ndarray) -> np.ndarray:
    """Event index of each object, for per-event object counts."""
    return np.repeat(np.arange(len(counts)), counts)


def _pareto(rng: np.random.Generator, xmin: float, alpha: float, size: int) -> np.ndarray:
    """Power-law (falling) spectrum dN/dx ~ x^-(alpha+1) above xmin."""
    return xmin * (1.0 - rng.random(size)) ** (-1.0 / alpha)


def _sort_in_events(event: np.ndarray, key: np.ndarray, n_events: int):
    """Order objects by event, then by descending ``key`` (NanoAOD sorts collections by pT).

    Returns ``(order, counts, local_of_original)``: ``order`` permutes flat arrays into the written order,
    ``local_of_original[k]`` is the within-event index that original object ``k`` ends up at.
    """
    order = np.lexsort((-key, event))
    counts = np.bincount(event, minlength=n_events)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    local = position - offsets[event]
    return order, counts, local


def _first_two_per_target(n_targets: int, target: np.ndarray, source_local: np.ndarray):
    """For each target object, the local indices of the first two sources pointing at it (or -1) and the
    number of such sources. ``target`` is the flat (global) target index per source, -1 for none."""
    idx1 = np.full(n_targets, -1, dtype=_I4)
    idx2 = np.full(n_targets, -1, dtype=_I4)
    n = np.zeros(n_targets, dtype=_I4)
    has = target >= 0
    if has.any():
        t = target[has]
        s = source_local[has]
        order = np.lexsort((s, t))
        t, s = t[order], s[order]
        n[:] = np.bincount(t, minlength=n_targets)
        first = np.ones(len(t), dtype=bool)
        first[1:] = t[1:] != t[:-1]
        idx1[t[first]] = s[first]
        second = np.zeros(len(t), dtype=bool)
        second[1:] = (~first[1:]) & first[:-1]
        idx2[t[second]] = s[second]
    return idx1, idx2, n


def _reduce_precision(values, bits: int) -> np.ndarray:
    """float32 with the mantissa rounded to ``bits`` bits, as NanoAOD stores most of its floats (this is
    what makes NanoAOD compress well; full-precision random floats would not)."""
    x = np.ascontiguousarray(values, dtype=_F4)
    if bits >= 23:
        return x
    shift = 23 - bits
    u = x.view(np.uint32)
    mask = np.uint32((0xFFFFFFFF << shift) & 0xFFFFFFFF)
    return ((u + np.uint32(1 << (shift - 1))) & mask).view(_F4)


def _btag_csvv2(rng: np.random.Generator, hadron_flavour: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """CSVv2-like discriminant: ~60% of b-jets, ~35% of c-jets, ~8% of light jets above 0.5.

    Jets outside the tracker (|eta| > 2.5) get the NanoAOD default of -10."""
    n = len(hadron_flavour)
    # Beta(a, 1) is above 0.5 with probability 1 - 0.5**a; Beta(1, b) with 0.5**b
    a = np.where(hadron_flavour == 5, 1.32, 1.0)
    b = np.select([hadron_flavour == 5, hadron_flavour == 4], [1.0, 1.5], 3.6)
    value = rng.beta(a, b, size=n)
    return np.where(np.abs(eta) > 2.5, -10.0, value)


# --------------------------------------------------------------------------------------------------------
# one block of events
# --------------------------------------------------------------------------------------------------------
def generate_block(
    n_events: int, *, seed: int = 0, process: str = "ttbar", block: int = 0, first_event: int = 1
) -> dict:
    """Generate one block of ``n_events`` synthetic NanoAOD events as a dict of numpy/awkward arrays,
    ready for ``uproot`` (``tree.extend(block)``): collections ``Jet``, ``GenJet``, ``Muon``, ``Electron``,
    ``GenPart`` as awkward records (uproot writes them as ``nJet`` + ``Jet_pt`` ...), ``PV_*``, ``MET_*``
    and the event-level ``run``, ``luminosityBlock``, ``event``, ``genWeight`` as numpy arrays.

    >>> block = generate_block(1000, seed=3, process="wjets")  # doctest: +SKIP
    >>> int(block["event"][0]), len(block["Jet"])  # doctest: +SKIP
    (1, 1000)
    """
    import awkward as ak

    if process not in PROCESSES:
        raise ValueError(f"unknown process {process!r}; choose one of {sorted(PROCESSES)}")
    model = PROCESSES[process]
    ss = np.random.SeedSequence([int(seed), zlib.crc32(process.encode()), int(block), FORMAT_VERSION])
    rng = np.random.default_rng(ss)
    n = int(n_events)

    # ---------------- event level
    n_lep_true = rng.choice(3, size=n, p=model.lepton_probs)
    npvs = rng.poisson(18.0, size=n).astype(_I4) + 1

    # ---------------- truth jets: (event, pt, eta, hadronFlavour, partonFlavour) per category
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add_jets(counts, pt, eta, hflav, pflav):
        ev = _repeat_events(counts)
        parts.append((ev, pt(len(ev)), eta(len(ev)), hflav(len(ev)), pflav(len(ev))))

    def quark_sign(size):
        return rng.choice(np.array([-1, 1]), size=size)

    def w_quarks(size):
        # hadronic W -> ud or cs: half of the W pairs carry a charm quark
        return np.where(rng.random(size) < 0.25, 4, 0)

    def w_partons(h):
        return np.where(h == 4, 4, rng.integers(1, 4, size=len(h))) * quark_sign(len(h))

    if process == "ttbar":
        add_jets(
            np.full(n, 2),
            lambda k: rng.gamma(3.0, 22.0, k),
            lambda k: rng.normal(0, 1.2, k),
            lambda k: np.full(k, 5),
            lambda k: 5 * quark_sign(k),
        )
        ev = _repeat_events(2 * (2 - n_lep_true))
        h = w_quarks(len(ev))
        parts.append((ev, rng.gamma(2.6, 20.0, len(ev)), rng.normal(0, 1.3, len(ev)), h, w_partons(h)))
    elif process == "single_top_t_chan":
        add_jets(
            np.ones(n, dtype=int),
            lambda k: rng.gamma(3.0, 20.0, k),
            lambda k: rng.normal(0, 1.2, k),
            lambda k: np.full(k, 5),
            lambda k: 5 * quark_sign(k),
        )
        # the forward light-quark jet that makes t-channel single top recognisable
        add_jets(
            np.ones(n, dtype=int),
            lambda k: rng.gamma(2.5, 25.0, k),
            lambda k: quark_sign(k) * np.abs(rng.normal(2.2, 0.9, k)),
            lambda k: np.zeros(k, dtype=int),
            lambda k: rng.integers(1, 4, k) * quark_sign(k),
        )
        # the spectator b of the 4-flavour scheme: soft and often lost
        add_jets(
            (rng.random(n) < 0.5).astype(int),
            lambda k: _pareto(rng, 12.0, 3.0, k),
            lambda k: rng.normal(0, 1.8, k),
            lambda k: np.full(k, 5),
            lambda k: 5 * quark_sign(k),
        )
        ev = _repeat_events(2 * (n_lep_true == 0))
        h = w_quarks(len(ev))
        parts.append((ev, rng.gamma(2.6, 20.0, len(ev)), rng.normal(0, 1.3, len(ev)), h, w_partons(h)))
    # initial-state radiation / associated jets for every process: a falling spectrum
    # geometric jet multiplicity (each extra jet costs a constant factor: staircase scaling)
    n_isr = rng.geometric(1.0 / (1.0 + model.isr_mean), size=n) - 1
    ev = _repeat_events(n_isr)
    u = rng.random(len(ev))
    h = np.select([u < model.b_isr_frac, u < model.b_isr_frac + 0.04], [5, 4], 0)
    p = np.where(
        h > 0,
        h * quark_sign(len(ev)),
        np.where(rng.random(len(ev)) < 0.65, 21, rng.integers(1, 4, len(ev)) * quark_sign(len(ev))),
    )
    parts.append((ev, _pareto(rng, 15.0, 2.0, len(ev)), rng.normal(0, 1.8, len(ev)), h, p))

    t_event = np.concatenate([x[0] for x in parts]).astype(np.int64)
    t_pt = np.concatenate([x[1] for x in parts])
    t_eta = np.clip(np.concatenate([x[2] for x in parts]), -6.0, 6.0)
    t_hflav = np.concatenate([x[3] for x in parts]).astype(_I4)
    t_pflav = np.concatenate([x[4] for x in parts]).astype(_I4)
    t_phi = rng.uniform(-np.pi, np.pi, len(t_event))
    t_mass = t_pt * rng.uniform(0.06, 0.20, len(t_event))

    # GenJets: truth jets above 10 GeV within |eta| < 5, sorted by pT
    is_gen = (t_pt > 10.0) & (np.abs(t_eta) < 5.0)
    g_src = np.flatnonzero(is_gen)
    g_order, g_counts, g_local = _sort_in_events(t_event[g_src], t_pt[g_src], n)
    truth_genjet_local = np.full(len(t_event), -1, dtype=_I4)
    truth_genjet_local[g_src] = g_local

    # reconstructed jets: detector response on the truth jets, plus pileup jets with no GenJet
    response = rng.normal(1.0, 0.12, len(t_event)) * (1.0 - 0.1 * np.exp(-t_pt / 40.0))
    n_pu = rng.poisson(0.12 * npvs)
    pu_event = _repeat_events(n_pu).astype(np.int64)
    k_pu = len(pu_event)
    j_event = np.concatenate([t_event, pu_event])
    j_pt = np.concatenate([t_pt * response, _pareto(rng, 14.0, 4.0, k_pu)])
    j_eta = np.concatenate([t_eta + rng.normal(0, 0.02, len(t_eta)), rng.uniform(-4.7, 4.7, k_pu)])
    j_phi = np.concatenate([t_phi + rng.normal(0, 0.02, len(t_phi)), rng.uniform(-np.pi, np.pi, k_pu)])
    j_mass = np.concatenate([t_mass * response, np.zeros(k_pu)])
    j_mass[len(t_eta) :] = j_pt[len(t_eta) :] * rng.uniform(0.08, 0.25, k_pu)
    j_hflav = np.concatenate([t_hflav, np.zeros(k_pu, dtype=_I4)])
    j_pflav = np.concatenate([t_pflav, np.zeros(k_pu, dtype=_I4)])
    j_genjet = np.concatenate([truth_genjet_local, np.full(k_pu, -1, dtype=_I4)])
    j_id = np.concatenate(
        [
            rng.choice(np.array([6, 2, 0], dtype=_I4), size=len(t_eta), p=[0.95, 0.03, 0.02]),
            rng.choice(np.array([6, 2, 0], dtype=_I4), size=k_pu, p=[0.80, 0.08, 0.12]),
        ]
    )
    keep = (j_pt > 15.0) & (np.abs(j_eta) < 4.7)
    j_phi = (j_phi + np.pi) % (2 * np.pi) - np.pi
    j_event, j_pt, j_eta, j_phi, j_mass = (a[keep] for a in (j_event, j_pt, j_eta, j_phi, j_mass))
    j_hflav, j_pflav, j_genjet, j_id = (a[keep] for a in (j_hflav, j_pflav, j_genjet, j_id))
    j_btag = _btag_csvv2(rng, j_hflav, j_eta)
    j_deepflav = np.clip(j_btag * rng.normal(1.0, 0.1, len(j_btag)), 0.0, 1.0)
    j_deepflav = np.where(j_btag < 0, -1.0, j_deepflav)
    j_order, j_counts, j_local = _sort_in_events(j_event, j_pt, n)
    j_offsets = np.concatenate([[0], np.cumsum(j_counts)])

    # ---------------- leptons
    # prompt leptons from W decays (isolated, well measured) ...
    p_event = _repeat_events(n_lep_true).astype(np.int64)
    k_p = len(p_event)
    p_is_mu = rng.random(k_p) < 0.5
    p_pt_true = 8.0 + rng.gamma(2.2, 20.0 if process != "wjets" else 17.0, k_p)
    p_eta_true = rng.normal(0, 1.2, k_p)
    p_phi_true = rng.uniform(-np.pi, np.pi, k_p)

    # GenPart: tops (ttbar: t and tbar; single top: t), then the leptonic Ws, then their leptons.
    n_tops = {"ttbar": 2, "single_top_t_chan": 1}.get(process, 0)
    top_counts = np.full(n, n_tops)
    gp_counts = top_counts + 2 * n_lep_true
    gp_offsets = np.concatenate([[0], np.cumsum(gp_counts)])
    top_event = _repeat_events(top_counts).astype(np.int64)
    top_slot = np.arange(len(top_event)) - np.concatenate([[0], np.cumsum(top_counts)])[top_event]
    lep_slot = np.arange(k_p) - np.concatenate([[0], np.cumsum(n_lep_true)])[p_event]
    # opposite charges for the two leptons of a dileptonic ttbar event (one from t, one from tbar)
    ev_sign = quark_sign(n)
    p_charge = (ev_sign[p_event] * np.where(lep_slot == 0, 1, -1)).astype(_I4)
    w_local = n_tops + lep_slot
    l_local = n_tops + n_lep_true[p_event] + lep_slot
    gp_total = int(gp_offsets[-1])
    gp_pt = np.empty(gp_total)
    gp_eta = np.empty(gp_total)
    gp_phi = np.empty(gp_total)
    gp_mass = np.empty(gp_total)
    gp_pdg = np.empty(gp_total, dtype=_I4)
    gp_status = np.empty(gp_total, dtype=_I4)
    gp_flags = np.empty(gp_total, dtype=_I4)
    gp_mother = np.empty(gp_total, dtype=_I4)
    ti = gp_offsets[top_event] + top_slot
    gp_pt[ti] = rng.gamma(2.0, 50.0, len(ti))
    gp_eta[ti] = rng.normal(0, 1.5, len(ti))
    gp_phi[ti] = rng.uniform(-np.pi, np.pi, len(ti))
    gp_mass[ti] = 172.5
    gp_pdg[ti] = np.where(top_slot == 0, 6, -6) if n_tops == 2 else 6 * ev_sign[top_event]
    gp_status[ti] = 62
    gp_flags[ti] = _FLAGS_HARD
    gp_mother[ti] = -1
    wi = gp_offsets[p_event] + w_local
    li = gp_offsets[p_event] + l_local
    gp_pt[wi] = p_pt_true * rng.uniform(0.8, 1.6, k_p)
    gp_eta[wi] = p_eta_true * rng.uniform(0.5, 1.0, k_p)
    gp_phi[wi] = p_phi_true
    gp_mass[wi] = 80.4
    gp_pdg[wi] = 24 * p_charge
    gp_status[wi] = 62
    gp_flags[wi] = _FLAGS_HARD
    # the W's mother is the top of the same charge sign (t -> W+ b), if there are tops
    if n_tops == 2:
        gp_mother[wi] = np.where(p_charge > 0, 0, 1)
    elif n_tops == 1:
        gp_mother[wi] = 0
    else:
        gp_mother[wi] = -1
    gp_pt[li] = p_pt_true
    gp_eta[li] = p_eta_true
    gp_phi[li] = p_phi_true
    gp_mass[li] = np.where(p_is_mu, 0.10566, 0.000511)
    gp_pdg[li] = np.where(p_is_mu, 13, 11) * -p_charge  # l+ has a negative PDG id
    gp_status[li] = 1
    gp_flags[li] = _FLAGS_LEPTON
    gp_mother[li] = w_local

    p_eff = np.where(p_is_mu, 0.95, 0.88)
    p_reco = (rng.random(k_p) < p_eff) & (np.abs(p_eta_true) < np.where(p_is_mu, 2.4, 2.5))
    p_pt = p_pt_true * rng.normal(1.0, np.where(p_is_mu, 0.02, 0.03))
    p_reco &= p_pt > np.where(p_is_mu, 3.0, 5.0)
    p_iso = rng.exponential(0.035, k_p)
    p_sip = np.abs(rng.normal(0, 1.3, k_p))
    p_tight = rng.random(k_p) < 0.96
    p_cut = rng.choice(np.array([0, 1, 2, 3, 4], dtype=_I4), size=k_p, p=[0.01, 0.03, 0.06, 0.15, 0.75])

    # ... and non-prompt leptons inside jets (heavy-flavour decays, fakes): not isolated, displaced.
    n_jets_ev = j_counts
    lam = np.where(n_jets_ev > 0, 0.15 * n_jets_ev, 0.0)
    n_np = rng.poisson(lam)
    np_event = _repeat_events(n_np).astype(np.int64)
    k_np = len(np_event)
    np_jet_local = (rng.random(k_np) * n_jets_ev[np_event]).astype(np.int64)
    np_jet_flat = j_order[j_offsets[np_event] + np_jet_local]  # index into the unsorted jet arrays
    np_is_mu = rng.random(k_np) < 0.5
    np_pt = j_pt[np_jet_flat] * rng.beta(1.3, 5.0, k_np)
    np_eta = j_eta[np_jet_flat] + rng.normal(0, 0.08, k_np)
    np_phi = j_phi[np_jet_flat] + rng.normal(0, 0.08, k_np)
    np_reco = (np_pt > np.where(np_is_mu, 3.0, 5.0)) & (np.abs(np_eta) < np.where(np_is_mu, 2.4, 2.5))
    np_iso = 0.05 + rng.exponential(0.6, k_np)
    np_sip = rng.exponential(5.0, k_np)
    np_tight = rng.random(k_np) < 0.6
    np_cut = rng.choice(np.array([0, 1, 2, 3, 4], dtype=_I4), size=k_np, p=[0.4, 0.25, 0.15, 0.1, 0.1])
    hf = j_hflav[np_jet_flat]
    np_flav = np.select([hf == 5, hf == 4], [5, 4], 3).astype(np.uint8)

    def leptons(is_mu: bool):
        sel_p = p_reco & (p_is_mu == is_mu)
        sel_np = np_reco & (np_is_mu == is_mu)
        ev = np.concatenate([p_event[sel_p], np_event[sel_np]])
        k1, k2 = int(sel_p.sum()), int(sel_np.sum())
        pt = np.concatenate([p_pt[sel_p], np_pt[sel_np]])
        eta = np.concatenate([p_eta_true[sel_p] + rng.normal(0, 0.002, k1), np_eta[sel_np]])
        phi = np.concatenate([p_phi_true[sel_p] + rng.normal(0, 0.002, k1), np_phi[sel_np]])
        phi = (phi + np.pi) % (2 * np.pi) - np.pi
        charge = np.concatenate([p_charge[sel_p], quark_sign(k2).astype(_I4)])
        iso03 = np.concatenate([p_iso[sel_p], np_iso[sel_np]])
        iso04 = iso03 * rng.uniform(1.0, 1.4, k1 + k2)
        sip = np.concatenate([p_sip[sel_p], np_sip[sel_np]])
        dxy = rng.normal(0, 1, k1 + k2) * np.where(np.arange(k1 + k2) < k1, 0.002, 0.02)
        dz = rng.normal(0, 1, k1 + k2) * np.where(np.arange(k1 + k2) < k1, 0.004, 0.04)
        jet_flat = np.concatenate([np.full(k1, -1), np_jet_flat[sel_np]])
        jet_local = np.where(jet_flat >= 0, j_local[np.maximum(jet_flat, 0)], -1).astype(_I4)
        gen_local = np.concatenate([l_local[sel_p], np.full(k2, -1)]).astype(_I4)
        gen_flav = np.concatenate([np.ones(k1, dtype=np.uint8), np_flav[sel_np]])
        pdg = (np.int32(13 if is_mu else 11) * -charge).astype(_I4)
        fields = {
            "pt": pt,
            "eta": eta,
            "phi": phi,
            "mass": np.full(k1 + k2, 0.10566 if is_mu else 0.000511),
            "charge": charge,
            "pdgId": pdg,
            "pfRelIso03_all": iso03,
            "pfRelIso04_all": iso04,
            "sip3d": sip,
            "dxy": dxy,
            "dz": dz,
            "jetIdx": jet_local,
            "genPartIdx": gen_local,
            "genPartFlav": gen_flav,
        }
        if is_mu:
            tight = np.concatenate([p_tight[sel_p], np_tight[sel_np]])
            fields["tightId"] = tight
            fields["mediumId"] = tight | (rng.random(k1 + k2) < 0.5)
            fields["looseId"] = np.ones(k1 + k2, dtype=bool)
            fields["isGlobal"] = fields["looseId"] & (rng.random(k1 + k2) < 0.97)
            fields["isTracker"] = np.ones(k1 + k2, dtype=bool)
            fields["isPFcand"] = np.ones(k1 + k2, dtype=bool)
        else:
            cut = np.concatenate([p_cut[sel_p], np_cut[sel_np]])
            fields["cutBased"] = cut
            fields["mvaFall17V2Iso_WP90"] = cut >= 3
            fields["mvaFall17V2Iso_WP80"] = (cut >= 4) & (rng.random(k1 + k2) < 0.9)
            fields["convVeto"] = rng.random(k1 + k2) < 0.97
        order, counts, _ = _sort_in_events(ev, pt, n)
        jet_global = np.where(jet_local >= 0, j_offsets[ev] + jet_local, -1)
        return fields, order, counts, jet_global

    mu_fields, mu_order, mu_counts, mu_jet_global = leptons(True)
    el_fields, el_order, el_counts, el_jet_global = leptons(False)

    # Jet -> lepton cross references, in the written (sorted) order of both collections
    def lepton_refs(order, counts, jet_global):
        local_sorted = np.arange(len(order)) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return _first_two_per_target(int(j_offsets[-1]), jet_global[order], local_sorted)

    mu1, mu2, n_mu_in_jet = lepton_refs(mu_order, mu_counts, mu_jet_global)
    el1, el2, n_el_in_jet = lepton_refs(el_order, el_counts, el_jet_global)

    # ---------------- MET: minus the vector sum of the visible objects (+ resolution)
    def px_py(ev, pt, phi):
        return (
            np.bincount(ev, pt * np.cos(phi), minlength=n),
            np.bincount(ev, pt * np.sin(phi), minlength=n),
        )

    jx, jy = px_py(j_event, j_pt, j_phi)
    met_x = -jx + rng.normal(0, 12.0, n)
    met_y = -jy + rng.normal(0, 12.0, n)
    lx = np.bincount(p_event[p_reco], (p_pt * np.cos(p_phi_true))[p_reco], minlength=n)
    ly = np.bincount(p_event[p_reco], (p_pt * np.sin(p_phi_true))[p_reco], minlength=n)
    met_x -= lx
    met_y -= ly
    sum_et = np.bincount(j_event, j_pt, minlength=n) + np.bincount(p_event[p_reco], p_pt[p_reco], minlength=n)

    # ---------------- assemble awkward collections in the written order
    def collection(fields: dict, order: np.ndarray, counts: np.ndarray, precision: dict):
        out = {}
        for name, values in fields.items():
            values = np.asarray(values)[order]
            if values.dtype.kind == "f":
                values = _reduce_precision(values, precision.get(name, precision.get("*", 10)))
            out[name] = ak.unflatten(values, counts)
        return ak.zip(out)

    jets = collection(
        {
            "pt": j_pt,
            "eta": j_eta,
            "phi": j_phi,
            "mass": j_mass,
            "btagCSVV2": j_btag,
            "btagDeepFlavB": j_deepflav,
            "jetId": j_id,
            "area": np.full(len(j_pt), 0.5) + rng.normal(0, 0.02, len(j_pt)),
            "hadronFlavour": j_hflav,
            "partonFlavour": j_pflav,
            "genJetIdx": j_genjet,
        },
        j_order,
        j_counts,
        {"*": 10, "eta": 12, "phi": 12},
    )
    for name, values in (
        ("muonIdx1", mu1),
        ("muonIdx2", mu2),
        ("electronIdx1", el1),
        ("electronIdx2", el2),
        ("nMuons", n_mu_in_jet),
        ("nElectrons", n_el_in_jet),
    ):
        jets[name] = ak.unflatten(values.astype(_I4), j_counts)
    genjets = collection(
        {
            "pt": t_pt[g_src],
            "eta": t_eta[g_src],
            "phi": t_phi[g_src],
            "mass": t_mass[g_src],
            "hadronFlavour": t_hflav[g_src].astype(np.uint8),
            "partonFlavour": t_pflav[g_src].astype(np.int16),
        },
        g_order,
        g_counts,
        {"*": 8},
    )
    lepton_precision = {"*": 10, "pt": 23, "eta": 12, "phi": 12}
    muons = collection(mu_fields, mu_order, mu_counts, lepton_precision)
    electrons = collection(el_fields, el_order, el_counts, lepton_precision)
    genpart = collection(
        {
            "pt": gp_pt,
            "eta": gp_eta,
            "phi": gp_phi,
            "mass": gp_mass,
            "pdgId": gp_pdg,
            "status": gp_status,
            "statusFlags": gp_flags,
            "genPartIdxMother": gp_mother,
        },
        np.arange(gp_total),  # generation order, not pT order, as in NanoAOD
        gp_counts,
        {"*": 8},
    )

    events = np.arange(first_event + block * BLOCK_SIZE, first_event + block * BLOCK_SIZE + n, dtype=np.uint64)
    gen_weight = np.where(rng.random(n) < model.neg_weight_frac, -1.0, 1.0).astype(_F4)
    return {
        "run": np.ones(n, dtype=np.uint32),
        "luminosityBlock": (1 + (events - 1) // 1000).astype(np.uint32),
        "event": events,
        "genWeight": gen_weight,
        "PV_npvs": npvs,
        "PV_npvsGood": np.maximum(npvs - rng.poisson(1.0, n).astype(_I4), 1).astype(_I4),
        "MET_pt": np.hypot(met_x, met_y).astype(_F4),
        "MET_phi": np.arctan2(met_y, met_x).astype(_F4),
        "MET_sumEt": sum_et.astype(_F4),
        "Jet": jets,
        "GenJet": genjets,
        "Muon": muons,
        "Electron": electrons,
        "GenPart": genpart,
    }


# --------------------------------------------------------------------------------------------------------
# files and filesets
# --------------------------------------------------------------------------------------------------------
def _provenance(n_events: int, seed: int, process: str, first_event: int) -> str:
    return json.dumps(
        {
            "generator": "mqexec.synthetic",
            "format_version": FORMAT_VERSION,
            "block_size": BLOCK_SIZE,
            "n_events": int(n_events),
            "seed": int(seed),
            "process": process,
            "first_event": int(first_event),
        },
        sort_keys=True,
    )


def _compression():
    import uproot

    try:
        import lz4  # noqa: F401  (uproot's LZ4 codec needs it)
    except ImportError:  # pragma: no cover - lz4 comes with the coffea extra
        return uproot.ZLIB(1)
    return uproot.LZ4(1)


def write_nanoaod(path, n_events: int, *, seed: int = 0, process: str = "ttbar", first_event: int = 1) -> Path:
    """Write ``n_events`` synthetic NanoAOD events of ``process`` to the ROOT file ``path`` (tree
    ``Events``) and return its path.

    The content depends only on ``(n_events, seed, process, first_event)``; ``first_event`` is the
    ``event`` number of the first entry (so files of one dataset can carry distinct event numbers).
    Events are written in blocks of :data:`BLOCK_SIZE` (one basket each), so memory stays flat for
    millions of events. The file is written under a temporary name and renamed when complete, and carries a
    ``mqexec_synthetic`` TObjString (JSON) that records how it was made.

    >>> from mqexec.synthetic import write_nanoaod
    >>> write_nanoaod("/tmp/ttbar.root", 20_000, seed=7, process="ttbar")  # doctest: +SKIP
    PosixPath('/tmp/ttbar.root')
    >>> from coffea.nanoevents import NanoEventsFactory, NanoAODSchema  # doctest: +SKIP
    >>> events = NanoEventsFactory.from_root({"/tmp/ttbar.root": "Events"}, schemaclass=NanoAODSchema,
    ...                                      mode="eager").events()  # doctest: +SKIP
    """
    import uproot

    if process not in PROCESSES:
        raise ValueError(f"unknown process {process!r}; choose one of {sorted(PROCESSES)}")
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
                    min(BLOCK_SIZE, n_events - start),
                    seed=seed,
                    process=process,
                    block=block,
                    first_event=first_event,
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
            return f["Events"].num_entries == expected
    except Exception:  # unreadable, truncated, not ROOT: rewrite it
        return False


def _file_seed(seed: int, process: str, index: int) -> int:
    """A per-file seed, distinct for every (seed, process, file index)."""
    return int(
        np.random.SeedSequence([int(seed), zlib.crc32(process.encode()), int(index)]).generate_state(
            1, dtype=np.uint32
        )[0]
    )


def make_fileset(
    directory,
    *,
    n_files: int = 8,
    events_per_file: int = 125_000,
    processes: Iterable[str] = ("ttbar", "wjets", "single_top_t_chan"),
    seed: int = 0,
) -> dict:
    """Write (or reuse) ``n_files`` files of ``events_per_file`` events *per process* into ``directory``
    and return a coffea fileset, AGC style::

        {"ttbar__nominal": {"files": {"/dir/ttbar__nominal_000.root": "Events", ...},
                            "metadata": {"process": "ttbar", "variation": "nominal",
                                         "nevts": n_files * events_per_file, "xsec": 729.84}},
         ...}

    Files that already exist with the same parameters (entries, seed, process, format version; recorded in
    the file) are reused, so calling this twice costs one ``uproot.open`` per file the second time.

    >>> from mqexec.synthetic import make_fileset
    >>> fileset = make_fileset("/tmp/agc", n_files=2, events_per_file=10_000, processes=("ttbar",))
    ... # doctest: +SKIP
    >>> fileset["ttbar__nominal"]["metadata"]["nevts"]  # doctest: +SKIP
    20000
    >>> from coffea import processor  # doctest: +SKIP
    >>> runner = processor.Runner(processor.FuturesExecutor(workers=2), schema=NanoAODSchema)
    ... # doctest: +SKIP
    >>> out = runner(fileset, processor_instance=MyProcessor())  # doctest: +SKIP
    """
    directory = Path(directory)
    n_files, events_per_file = int(n_files), int(events_per_file)
    if n_files <= 0 or events_per_file <= 0:
        raise ValueError("n_files and events_per_file must be positive")
    processes = tuple(processes)
    for process in processes:
        if process not in PROCESSES:
            raise ValueError(f"unknown process {process!r}; choose one of {sorted(PROCESSES)}")
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


def main(argv=None) -> int:
    """Command line: write a synthetic AGC fileset and print it as JSON.

    ``python -m mqexec.synthetic /tmp/agc --files 8 --events 125000 [--seed 0] [--processes ttbar wjets]``
    """
    parser = argparse.ArgumentParser(prog="python -m mqexec.synthetic", description=main.__doc__.splitlines()[0])
    parser.add_argument("outdir", help="directory for the ROOT files (created if missing)")
    parser.add_argument("--files", type=int, default=8, help="files per process (default: 8)")
    parser.add_argument("--events", type=int, default=125_000, help="events per file (default: 125000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--processes", nargs="+", default=["ttbar", "wjets", "single_top_t_chan"], choices=sorted(PROCESSES)
    )
    parser.add_argument("--output", help="also write the fileset JSON to this file")
    args = parser.parse_args(argv)
    fileset = make_fileset(
        args.outdir, n_files=args.files, events_per_file=args.events, processes=args.processes, seed=args.seed
    )
    text = json.dumps(fileset, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
