"""A PNG of a benchmark's table: one horizontal bar per executor, its throughput (longer is better).

Each benchmark prints its markdown table (for ``docs/benchmarks.md``), then::

    print(save_bar_chart({"mqexec (batched map)": 7811.0, "distributed.Client": 2410.0}, "noop",
                         "10,000 no-op tasks", unit="tasks/s"))

which writes ``docs/img/noop.png`` (or ``$MQEXEC_BENCH_PLOTS/noop.png``) and returns the line to print: where
the PNG is, or why there is none (matplotlib is optional: the table is the result, the chart a view of it).
Drawn on matplotlib's Agg canvas, so no screen is needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

#: Where the PNGs go: next to the benchmark tables' page, docs/benchmarks.md.
PLOT_DIR = Path(os.environ.get("MQEXEC_BENCH_PLOTS") or Path(__file__).resolve().parents[1] / "docs" / "img")
_MQEXEC, _OTHER = "#e42536", "#5790fc"


def save_bar_chart(rows: Mapping[str, float | None], name: str, title: str, *, unit: str) -> str:
    """Save ``rows`` (executor label -> throughput in ``unit``, ``None`` for a run that failed) as a bar
    chart ``PLOT_DIR/<name>.png``, bars in table order from the top, mqexec's in red; return one line
    saying where it is, or why there is no PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        missing = (exc.name or "matplotlib").split(".")[0]
        return f"no PNG of the table: {missing} is not installed (pip install 'mqexec[plot]')"

    labels = list(rows)
    names = [label.replace("`", "") for label in labels]  # labels come from markdown tables
    values = [rows[label] or 0.0 for label in labels]
    fig = Figure(figsize=(10, 1.2 + 0.6 * len(labels)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    y = range(len(labels))
    colours = [_MQEXEC if "mqexec" in label.lower() else _OTHER for label in labels]
    ax.barh(y, values, color=colours)
    top = max(values, default=0.0) or 1.0
    for i, label in enumerate(labels):
        value = rows[label]
        text = "failed" if value is None else f"{value:,.0f}"
        ax.text((value or 0.0) + 0.01 * top, i, text, va="center")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()  # first row of the table on top
    ax.set_xlim(0, 1.18 * top)
    ax.set_xlabel(f"throughput [{unit}]")
    ax.set_title(title)
    ax.spines[["top", "right"]].set_visible(False)
    PLOT_DIR.mkdir(parents=True, exist_ok=True)
    path = PLOT_DIR / f"{name}.png"
    fig.savefig(path, dpi=100)
    return f"bar chart of the table saved to {path}"
