#!/usr/bin/env python
"""The Analysis Grand Challenge (AGC) CMS ttbar analysis, run by coffea's Runner with a choice of executor.

The processor follows the AGC ``cms-open-data-ttbar`` pipeline: one tight lepton (e or mu, pT > 30 GeV,
|eta| < 2.1), >= 4 jets (pT > 30 GeV, |eta| < 2.4, tight-lepton-veto ID) and b-tags with CSVv2 >= 0.5, in two
regions: ``4j1b`` (exactly one b-tag; observable HT = scalar sum of jet pT) and ``4j2b`` (>= 2 b-tags;
observable = mass of the b-tagged three-jet system with the largest pT). Histograms have 25 bins from 50 to
550 GeV x process x variation, with ``Weight()`` storage; the variations are the nominal, jet-pT scale up and
down (+-3%), a jet-pT resolution smearing, four b-tag weight variations up and down, and for W+jets the
renormalisation-scale weights up and down.

Run it (data are synthetic, generated on first use and cached in ``--data-dir``; the 4j1b and 4j2b
histograms, stacked by process, are saved to ``agc_ttbar.png`` in the current directory, or ``--plot PATH``)::

    python docs/examples/agc_ttbar.py                       # executor = MQExecutor() (the default)
    python docs/examples/agc_ttbar.py --executor futures    # coffea's FuturesExecutor(workers=2)
    python docs/examples/agc_ttbar.py --executor iterative --files 2 --events 50000

or use it from Python (tests import this file by path)::

    >>> agc = importlib.import_module("agc_ttbar")  # doctest: +SKIP
    >>> fileset = agc.build_fileset("/tmp/agc", n_files=2, events_per_file=20_000)  # doctest: +SKIP
    >>> output, metrics, wall = agc.run_analysis(fileset, processor.IterativeExecutor())  # doctest: +SKIP
    >>> output["hist_dict"]["4j1b"][:, "ttbar", "nominal"].sum()  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import cast

import awkward as ak
import hist
import numpy as np
from coffea import processor
from coffea.analysis_tools import PackedSelection
from coffea.nanoevents import NanoAODSchema

#: Integrated luminosity of the 2015 CMS Open Data the AGC uses, in /pb.
LUMI_PB = 3378.0
#: CSVv2 working point of the AGC.
B_TAG_THRESHOLD = 0.5
#: Jet-pT variations that change the event selection (kinematic systematics).
JET_PT_VARIATIONS = {"pt_scale_up": 1.03, "pt_scale_down": 0.97, "pt_res_up": None}
REGIONS = ("4j1b", "4j2b")
#: Legend label and colour (CMS's recommended palette) of each process, stacked bottom to top in this order.
PROCESS_STYLE = {
    "wjets": ("W+jets", "#5790fc"),
    "single_top_t_chan": ("single top, t-channel", "#f89c20"),
    "ttbar": (r"$t\bar{t}$", "#e42536"),
}
#: Colours for processes not in PROCESS_STYLE (stacked below those, in name order).
OTHER_COLOURS = ("#964a8b", "#9c9ca1", "#7a21dd")
#: Per region: the observable's axis label and the selection, for the plot.
REGION_LABELS = {
    "4j1b": (r"$H_T$ [GeV]", r"1 lepton, $\geq 4$ jets, 1 b-tag"),
    "4j2b": (r"$m_{bjj}$ [GeV]", r"1 lepton, $\geq 4$ jets, $\geq 2$ b-tags"),
}


def _jet_pt_resolution(counts: np.ndarray, seed: list[int]) -> ak.Array:
    """Per-jet Gaussian smearing factors (5% width), seeded by the chunk so every executor gets the same."""
    rng = np.random.default_rng(seed)
    return ak.unflatten(rng.normal(1.0, 0.05, int(np.sum(counts))), counts)


def _btag_weight_variation(i_jet: int, jet_pt: ak.Array) -> np.ndarray:
    """AGC toy b-tag weight variation of the i-th jet: 7.5% x (jet pT / 50 GeV), up and down -> (2, n)."""
    pt = ak.to_numpy(jet_pt[:, i_jet])
    return 1.0 + np.array([[0.075], [-0.075]]) * (pt / 50.0)


def _chunk_seed(metadata: dict) -> list[int]:
    """A seed that depends only on which piece of which file this chunk is (not on the executor)."""
    name = os.path.basename(str(metadata.get("filename", "")))
    return [zlib.crc32(name.encode()), int(metadata.get("entrystart", 0))]


def new_histogram() -> hist.Hist:
    """The AGC histogram: 25 bins 50-550 GeV x process x variation, weighted.

    >>> h = new_histogram()
    >>> h.fill(observable=[100.0], process="ttbar", variation="nominal", weight=[2.0]).sum().value
    2.0
    """
    return (
        hist.Hist.new.Reg(25, 50, 550, name="observable", label="observable [GeV]")
        .StrCat([], name="process", label="Process", growth=True)
        .StrCat([], name="variation", label="Systematic variation", growth=True)
        .Weight()
    )


class TtbarAnalysis(processor.ProcessorABC):
    """The AGC CMS ttbar processor for coffea's ``processor.Runner`` with ``NanoAODSchema``.

    Datasets carry ``metadata = {"process": ..., "variation": ..., "nevts": ..., "xsec": ...}`` (see
    :func:`build_fileset`); each event gets the weight ``xsec * lumi / nevts``.

    >>> runner = processor.Runner(processor.FuturesExecutor(workers=2), schema=NanoAODSchema)
    ... # doctest: +SKIP
    >>> out = runner(fileset, processor_instance=TtbarAnalysis())  # doctest: +SKIP
    >>> out["hist_dict"]["4j2b"]  # doctest: +SKIP
    """

    def __init__(self, lumi: float = LUMI_PB, *, quiet_schema: bool = True):
        self.lumi = lumi
        self.quiet_schema = quiet_schema

    def __setstate__(self, state):
        # coffea unpickles the processor in the worker before it builds the chunk's NanoEvents: this is the
        # AGC notebook's ``NanoAODSchema.warn_missing_crossrefs = False`` (no warnings about cross-references
        # to collections the files do not carry: Photon, Tau, FatJet...), applied in every worker process.
        self.__dict__.update(state)
        if self.quiet_schema:
            NanoAODSchema.warn_missing_crossrefs = False

    def process(self, events):
        metadata = events.metadata
        process = metadata["process"]
        variation = metadata.get("variation", "nominal")
        xsec_weight = metadata["xsec"] * self.lumi / metadata["nevts"]
        hists = {region: new_histogram() for region in REGIONS}

        kinematic = ["nominal"]
        if variation == "nominal":  # systematics only on the nominal samples, as in the AGC
            kinematic += list(JET_PT_VARIATIONS)

        for syst in kinematic:
            electrons, muons, jets = events.Electron, events.Muon, events.Jet
            if syst in JET_PT_VARIATIONS:
                factor = JET_PT_VARIATIONS[syst]
                if factor is None:
                    factor = _jet_pt_resolution(ak.to_numpy(ak.num(jets)), _chunk_seed(metadata))
                jets = ak.with_field(jets, jets.pt * factor, "pt")

            electrons = electrons[
                (electrons.pt > 30) & (np.abs(electrons.eta) < 2.1) & (electrons.cutBased == 4) & (electrons.sip3d < 4)
            ]
            muons = muons[
                (muons.pt > 30)
                & (np.abs(muons.eta) < 2.1)
                & muons.tightId
                & (muons.sip3d < 4)
                & (muons.pfRelIso04_all < 0.15)
            ]
            jets = jets[(jets.pt > 30) & (np.abs(jets.eta) < 2.4) & jets.isTightLeptonVeto]

            selections = PackedSelection(dtype="uint64")
            n_btag = ak.sum(jets.btagCSVV2 >= B_TAG_THRESHOLD, axis=1)
            selections.add("exactly_1l", ak.to_numpy((ak.num(electrons) + ak.num(muons)) == 1))
            selections.add("atleast_4j", ak.to_numpy(ak.num(jets) >= 4))
            selections.add("exactly_1b", ak.to_numpy(n_btag == 1))
            selections.add("atleast_2b", ak.to_numpy(n_btag >= 2))
            selections.add("4j1b", selections.all("exactly_1l", "atleast_4j", "exactly_1b"))
            selections.add("4j2b", selections.all("exactly_1l", "atleast_4j", "atleast_2b"))

            for region in REGIONS:
                region_jets = jets[selections.all(region)]
                weights = np.full(len(region_jets), xsec_weight)
                if region == "4j1b":
                    observable = ak.to_numpy(ak.sum(region_jets.pt, axis=-1))
                else:
                    # hadronic top candidate: the b-tagged three-jet system with the largest pT
                    trijet = ak.combinations(region_jets, 3, fields=["j1", "j2", "j3"])
                    p4 = trijet.j1 + trijet.j2 + trijet.j3
                    max_btag = np.maximum(trijet.j1.btagCSVV2, np.maximum(trijet.j2.btagCSVV2, trijet.j3.btagCSVV2))
                    p4 = p4[max_btag >= B_TAG_THRESHOLD]  # same cut as the b-tag count
                    best = ak.argmax(p4.pt, axis=1, keepdims=True)
                    observable = ak.to_numpy(ak.flatten(p4[best].mass))

                fill = hists[region].fill
                if syst != "nominal":
                    fill(observable=observable, process=process, variation=syst, weight=weights)
                    continue
                fill(observable=observable, process=process, variation=variation, weight=weights)
                if variation != "nominal":
                    continue
                for i_jet in range(4):
                    up, down = _btag_weight_variation(i_jet, region_jets.pt)
                    for direction, w in (("up", up), ("down", down)):
                        fill(
                            observable=observable,
                            process=process,
                            variation=f"btag_var_{i_jet}_{direction}",
                            weight=weights * w,
                        )
                if process == "wjets":
                    for direction, w in (("up", 1.025), ("down", 0.975)):
                        fill(
                            observable=observable,
                            process=process,
                            variation=f"scale_var_{direction}",
                            weight=weights * w,
                        )

        return {"nevents": {metadata["dataset"]: len(events)}, "hist_dict": hists}

    def postprocess(self, accumulator):
        return accumulator


# ---------------------------------------------------------------------------------------------------------
# data, executors, running
# ---------------------------------------------------------------------------------------------------------
def build_fileset(
    directory,
    n_files: int = 2,
    events_per_file: int = 125_000,
    *,
    seed: int = 0,
    processes=("ttbar", "wjets", "single_top_t_chan"),
) -> dict:
    """The AGC-style fileset of synthetic NanoAOD (``n_files`` files per process), written on first use.

    >>> fileset = build_fileset("/tmp/agc", n_files=2, events_per_file=20_000)  # doctest: +SKIP
    >>> fileset["ttbar__nominal"]["metadata"]  # doctest: +SKIP
    {'process': 'ttbar', 'variation': 'nominal', 'nevts': 40000, 'xsec': 729.84}
    """
    tools = str(Path(__file__).resolve().parents[2] / "tools")  # the generator is repository tooling
    if tools not in sys.path:
        sys.path.insert(0, tools)
    from synthetic import make_fileset

    return make_fileset(directory, n_files=n_files, events_per_file=events_per_file, processes=processes, seed=seed)


def _mqexec_executor(workers: int):
    from mqexec import MQExecutor

    return MQExecutor()


#: Executor factories by name (argument: number of local workers). Switching executors is this one line.
EXECUTORS = {
    "mqexec": _mqexec_executor,
    "futures": lambda workers: processor.FuturesExecutor(workers=workers),
    "iterative": lambda workers: processor.IterativeExecutor(),
}


def _ship_processor_by_value():
    """coffea cloudpickles the processor; a class from this file (not an installed module) must travel by
    value so that worker processes (loky, Dask, MQExecutor) can load it."""
    module = sys.modules.get(__name__)
    if module is not None and __name__ != "__main__":
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)


def run_analysis(fileset: dict, executor, *, chunksize: int = 100_000, maxchunks: int | None = None):
    """Run :class:`TtbarAnalysis` over ``fileset`` with ``executor``; return ``(output, metrics, wall_s)``.

    >>> out, metrics, wall = run_analysis(fileset, processor.FuturesExecutor(workers=2))  # doctest: +SKIP
    >>> sum(out["nevents"].values()) / wall  # events/s  # doctest: +SKIP
    """
    _ship_processor_by_value()
    runner = processor.Runner(
        executor=executor,
        schema=NanoAODSchema,
        savemetrics=True,
        metadata_cache={},
        chunksize=chunksize,
        maxchunks=maxchunks,
    )
    previous = NanoAODSchema.warn_missing_crossrefs  # in-process executors change it: restore it
    start = time.perf_counter()
    try:
        output, metrics = runner(fileset, processor_instance=TtbarAnalysis())
    finally:
        NanoAODSchema.warn_missing_crossrefs = previous
    return output, metrics, time.perf_counter() - start


def region_yields(output: dict, fileset: dict) -> dict:
    """``{region: {process: (selected events, weighted yield)}}`` of the nominal histograms (with flow).

    The count of selected events follows from the constant per-dataset weight ``xsec * lumi / nevts``.
    """
    result: dict[str, dict[str, tuple[int, float]]] = {}
    for region, h in output["hist_dict"].items():
        result[region] = {}
        for spec in fileset.values():
            meta = spec["metadata"]
            process = meta["process"]
            if process not in h.axes["process"] or "nominal" not in h.axes["variation"]:
                result[region][process] = (0, 0.0)
                continue
            total = float(h[:, process, "nominal"].sum(flow=True).value)
            weight = meta["xsec"] * LUMI_PB / meta["nevts"]
            result[region][process] = (round(total / weight), total)
    return result


def summary(output: dict, fileset: dict, wall: float, executor_name: str) -> str:
    """A few lines: events processed, per-region yields, wall time, events/s."""
    n_events = sum(output["nevents"].values())
    lines = [f"executor {executor_name}: {n_events:,} events in {wall:.2f} s = {n_events / wall:,.0f} events/s"]
    for region, per_process in region_yields(output, fileset).items():
        parts = ", ".join(f"{p} {n:,} ev ({y:,.1f})" for p, (n, y) in per_process.items())
        lines.append(f"  {region}: {parts}")
    return "\n".join(lines)


def _nominal(h: hist.Hist, process: str) -> hist.Hist:
    """The nominal histogram of ``process``; empty if the process never passed this region's selection."""
    if process in h.axes["process"] and "nominal" in h.axes["variation"]:
        return cast(hist.Hist, h[:, process, "nominal"])
    return hist.Hist(h.axes["observable"], storage=hist.storage.Weight())


def _plot_region(ax, h: hist.Hist, region: str, processes: list[str]) -> None:
    """One panel: the nominal histograms of ``region`` stacked by process, with the MC statistical error."""
    import mplhep as hep

    edges = h.axes["observable"].edges
    xlabel, selection = REGION_LABELS[region]
    if processes:
        others = iter(OTHER_COLOURS * len(processes))
        styles = [PROCESS_STYLE.get(p) or (p, next(others)) for p in processes]
        stack = [_nominal(h, p) for p in processes]
        hep.histplot(
            stack,
            stack=True,
            histtype="fill",
            label=[label for label, _ in styles],
            color=[colour for _, colour in styles],
            edgecolor="black",
            linewidth=0.8,
            flow="none",
            ax=ax,
        )
        total = sum(stack[1:], stack[0])
        value, variances = total.values(), total.variances()
        error = np.sqrt(value if variances is None else variances)  # None only for storages without variances
        ax.stairs(
            value + error,
            edges,
            baseline=value - error,
            fill=True,
            facecolor="none",
            edgecolor="dimgrey",
            hatch="////",
            linewidth=0,
            label="MC stat. unc.",
        )
        ax.set_ylim(0, 1.45 * max(float(np.max(value + error)), 1e-9))
        ax.legend(title=selection, loc="upper right")
    else:
        ax.text(0.5, 0.5, f"{selection}:\nno event selected", transform=ax.transAxes, ha="center")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"Events / {edges[1] - edges[0]:g} GeV")
    hep.label.exp_label(exp="AGC", llabel="Synthetic NanoAOD", lumi=LUMI_PB / 1000, lumi_format="{0:.1f}", ax=ax)


def plot_regions(output: dict, path) -> Path:
    """Save the 4j1b (HT) and 4j2b (m_bjj) histograms side by side, stacked by process (the same processes
    and colours in both), in the CMS style of mplhep, as the PNG ``path``; return its absolute path. Draws
    with matplotlib's Agg canvas (no screen) and leaves the caller's matplotlib settings as they were.

    >>> plot_regions(output, "agc_ttbar.png")  # doctest: +SKIP
    PosixPath('/home/me/agc_ttbar.png')
    """
    import matplotlib
    import mplhep as hep
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    present = {p for region in REGIONS for p in output["hist_dict"][region].axes["process"]}
    processes = sorted(present - set(PROCESS_STYLE)) + [p for p in PROCESS_STYLE if p in present]
    path = Path(path).resolve()
    with matplotlib.rc_context():
        hep.style.use("CMS")
        fig = Figure(figsize=(20, 9), layout="constrained")
        FigureCanvasAgg(fig)
        for ax, region in zip(fig.subplots(1, 2), REGIONS, strict=True):
            _plot_region(ax, output["hist_dict"][region], region, processes)
        fig.savefig(path, dpi=100)
    return path


def save_plot(output: dict, path) -> str:
    """:func:`plot_regions`, and the one line to print: where the plot is, or why there is none."""
    try:
        saved = plot_regions(output, path)
    except ImportError as exc:  # matplotlib / mplhep come with mqexec[coffea]; a bare coffea may lack them
        return f"no plot: {exc.name or exc} is not installed (pip install 'mqexec[plot]')"
    return f"plot of the 4j1b and 4j2b histograms by process saved to {saved}"


def main(argv=None) -> int:
    """Command line entry point; ``main(["--executor", "futures", "--files", "1", "--events", "20000"])``."""
    parser = argparse.ArgumentParser(description="AGC CMS ttbar analysis on synthetic NanoAOD")
    parser.add_argument("--executor", choices=sorted(EXECUTORS), default="mqexec")
    parser.add_argument("--workers", type=int, default=2, help="local workers (futures executor)")
    parser.add_argument("--files", type=int, default=2, help="files per process")
    parser.add_argument("--events", type=int, default=125_000, help="events per file")
    parser.add_argument("--chunksize", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir",
        default=os.path.join(tempfile.gettempdir(), "mqexec-agc-data"),
        help="where the synthetic files are written/reused",
    )
    parser.add_argument("--plot", default="agc_ttbar.png", help="PNG of the histograms (default: %(default)s)")
    args = parser.parse_args(argv)

    fileset = build_fileset(args.data_dir, args.files, args.events, seed=args.seed)
    executor = EXECUTORS[args.executor](args.workers)
    output, _metrics, wall = run_analysis(fileset, executor, chunksize=args.chunksize)
    print(summary(output, fileset, wall, args.executor))
    print(save_plot(output, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
