"""The knobs of the toy model per physics process, and the constants that fix the generated content."""

from __future__ import annotations

from dataclasses import dataclass

#: Entries generated (and written as one basket) at a time. Part of the file format: changing it changes
#: the generated events, so it is folded into :data:`FORMAT_VERSION`.
BLOCK_SIZE = 50_000
#: Bumped whenever the generated content changes; cached files with another version are rewritten.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ProcessModel:
    """Knobs of the toy model for one physics process.

    ``lepton_probs`` are the probabilities of 0, 1, 2 prompt electrons/muons from W decays; the hard jets
    follow from the process (two top b-jets and the hadronic W daughters for ttbar, ...); ``isr_mean`` is
    the mean number of extra (initial-state radiation) jets above 15 GeV, drawn from a geometric distribution
    (the "staircase scaling" of jet multiplicities) with a power-law pT spectrum; ``b_isr_frac`` is the
    fraction of them that are b-jets (gluon splitting); ``xsec`` is the cross-section in pb used by
    ``make_fileset``; ``tops`` the number of top quarks in GenPart; ``lepton_pt_scale`` the scale (GeV) of
    the prompt leptons' gamma-distributed pT.

    >>> ProcessModel(xsec=1.0, lepton_probs=(1.0, 0.0, 0.0), isr_mean=1.0, b_isr_frac=0.0).tops
    0
    """

    xsec: float
    lepton_probs: tuple[float, float, float]
    isr_mean: float
    b_isr_frac: float
    neg_weight_frac: float = 0.0
    tops: int = 0
    lepton_pt_scale: float = 20.0


#: The processes of the AGC CMS ttbar fileset that this package can imitate (cross-sections approximate,
#: in pb, as used by the AGC: ttbar NNLO, W(->lnu)+jets, t-channel single top).
PROCESSES: dict[str, ProcessModel] = {
    "ttbar": ProcessModel(xsec=729.84, lepton_probs=(0.50, 0.41, 0.09), isr_mean=1.3, b_isr_frac=0.03, tops=2),
    "wjets": ProcessModel(
        xsec=15487.16,
        lepton_probs=(0.33, 0.67, 0.0),
        isr_mean=0.9,
        b_isr_frac=0.04,
        neg_weight_frac=0.15,
        lepton_pt_scale=17.0,
    ),
    "single_top_t_chan": ProcessModel(
        xsec=214.2, lepton_probs=(0.67, 0.33, 0.0), isr_mean=1.0, b_isr_frac=0.03, tops=1
    ),
}


def process_model(process: str) -> ProcessModel:
    """The model of ``process``, or a ``ValueError`` naming the known ones.

    >>> process_model("ttbar").tops
    2
    """
    try:
        return PROCESSES[process]
    except KeyError:
        raise ValueError(f"unknown process {process!r}; choose one of {sorted(PROCESSES)}") from None
