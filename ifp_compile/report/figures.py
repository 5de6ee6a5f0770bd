"""The report's figures, as PNG bytes.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through
pyplot: no global figure registry to leak into, no GUI backend picked up from the
environment. The rc parameters that shape the output are pinned and the PNG's
``Software`` text chunk is dropped, so the same data gives the same bytes (the HTML
report is byte-identical from run to run).
"""

from __future__ import annotations

import io
import math
from contextlib import contextmanager

import numpy as np

from .data import KeptWidth, ReportData
from .overlap import Overlap

DPI = 100
RC = {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9,
      "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": DPI, "savefig.dpi": DPI,
      "image.interpolation": "nearest", "path.simplify": False}
MARKERS = "osD^v<>ph*"
LABEL_CHARS = 14  # heatmap tick labels longer than this are shortened
SHORT_LABEL = 6  # heatmap labels up to this long go on both axes, longer ones are numbered
TICKS_UP_TO = 12  # heatmaps of more tasks than this carry no tick labels (the page lists the order)
ANNOTATE_UP_TO = 4  # heatmaps of at most this many tasks print each cell's value


@contextmanager
def _figure(width: float, height: float):
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasAgg(fig)
        try:
            yield fig
        finally:
            fig.clear()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _colour(i: int, n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "\u2026"


def kept_width_png(data: ReportData, kept: list[KeptWidth]) -> bytes:
    """x = layer, y = kept channels: one line per task, the dense width dashed."""
    groups = list(dict.fromkeys(k.group for k in kept))
    members = list(dict.fromkeys(k.member for k in kept))
    layers = np.arange(len(data.widths))
    legend_cols = 1 if len(kept) <= 20 else 2
    with _figure(8.5 + 1.6 * legend_cols, 4.2) as fig:
        ax = fig.add_subplot()
        ax.plot(layers, data.widths, linestyle="--", color="black", linewidth=1.2, label="dense width")
        for k in kept:
            g, m = groups.index(k.group), members.index(k.member)
            style = "-" if len(groups) <= 20 or g < 20 else ":"
            marker = MARKERS[m % len(MARKERS)] if k.member else ("o" if len(layers) <= 12 else None)
            ax.plot(layers, k.per_layer, linestyle=style, color=_colour(g, len(groups)), linewidth=1.2,
                    marker=marker, markersize=3.5, label=k.label)
        ax.set_xlabel("layer")
        ax.set_ylabel("kept FFN channels" + (" (mean over examples)" if data.kind == "eval" else ""))
        ax.set_ylim(0, max(data.widths) * 1.05)
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        fig.legend(loc="outside right upper", ncols=legend_cols, frameon=False)
        return _png(fig)


def heatmap_grid_png(o: Overlap, title: str) -> bytes:
    """One small heatmap per layer, one shared 0..1 colour scale."""
    import matplotlib

    n_layers, n = o.matrices.shape[0], len(o.shown)
    cols = min(n_layers, 6)
    rows = math.ceil(n_layers / cols)
    cell = 1.75 if n <= TICKS_UP_TO else 1.5
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d0d0d0")
    # short names (domains) on both axes; longer ones on the y axis only, numbered, with the
    # numbers on the x axis, so every column of heatmaps keeps one height
    numbered = max(len(s) for s in o.shown) > SHORT_LABEL
    ylabels = [f"{i}: {_short(s)}" if numbered else s for i, s in enumerate(o.shown)]
    xlabels = [str(i) for i in range(n)] if numbered else list(o.shown)
    with _figure(cols * cell + 1.2, rows * cell + 0.6) as fig:
        axes = fig.subplots(rows, cols, squeeze=False)
        image = None
        for layer, ax in enumerate(axes.flat):
            if layer >= n_layers:
                ax.set_axis_off()
                continue
            m = o.matrices[layer]
            image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {layer}", fontsize=8, pad=3)
            show_ticks = n <= TICKS_UP_TO
            ax.set_xticks(range(n) if show_ticks else [])
            ax.set_yticks(range(n) if show_ticks else [])
            if show_ticks:
                bottom = layer + cols >= n_layers  # nothing drawn below this one
                ax.set_xticklabels(xlabels if bottom else [], fontsize=7, rotation=0 if numbered else 90)
                ax.set_yticklabels(ylabels if layer % cols == 0 else [], fontsize=7)
            if n <= ANNOTATE_UP_TO:
                for i in range(n):
                    for j in range(n):
                        v = m[i, j]
                        if not np.isnan(v):
                            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                                    color="black" if v > 0.6 else "white")
        fig.colorbar(image, ax=axes, shrink=min(1.0, 4.0 / rows + 0.2), label="Jaccard overlap of kept channels")
        fig.suptitle(title, fontsize=10)
        return _png(fig)


def overlap_lines_png(overlaps: list[Overlap]) -> bytes:
    """Mean cross-task (solid) and within-task (dashed) overlap against depth."""
    with _figure(9.5, 4.0) as fig:
        ax = fig.add_subplot()
        for i, o in enumerate(overlaps):
            colour = _colour(i, len(overlaps))
            layers = np.arange(len(o.cross))
            label = f"{o.name}: cross-task" if o.within is not None else "cross-task (pairs of different tasks)"
            ax.plot(layers, o.cross, color=colour, marker="o", markersize=3.5, linewidth=1.4, label=label)
            if o.within is not None:
                ax.plot(layers, o.within, color=colour, marker="s", markersize=3, linewidth=1.2, linestyle="--",
                        label=f"{o.name}: within-task")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean Jaccard overlap")
        ax.set_ylim(0, 1.03)
        ax.set_xlim(-0.5, len(overlaps[0].cross) - 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        fig.legend(loc="outside right upper", frameon=False)
        return _png(fig)


def intervals_png(intervals: list[dict]) -> bytes:
    """One horizontal bar per (row, domain): mean loss difference against the baseline row
    with its 95% paired bootstrap interval; left of 0 = better than the baseline."""
    rows = list(dict.fromkeys(str(iv["row"]) for iv in intervals))
    domains = list(dict.fromkeys(str(iv["domain"]) for iv in intervals))
    by = {(str(iv["row"]), str(iv["domain"])): iv for iv in intervals}
    height = 0.8 / max(len(rows), 1)
    with _figure(8.5, 1.2 + 0.45 * len(domains) * max(len(rows), 1) ** 0.5) as fig:
        ax = fig.add_subplot()
        for j, row in enumerate(rows):
            ys, means, errs = [], [], []
            for i, d in enumerate(domains):
                iv = by.get((row, d))
                if iv is None:
                    continue
                ys.append(i + (j - (len(rows) - 1) / 2) * height)
                means.append(iv["mean"])
                errs.append([iv["mean"] - iv["low"], iv["high"] - iv["mean"]])
            if ys:
                ax.errorbar(means, ys, xerr=np.array(errs).T, fmt="o", capsize=3, color=_colour(j, len(rows)),
                            label=row if len(row) <= 64 else row[:63] + "\u2026")  # rows differ late in the name
        ax.axvline(0.0, color="black", linewidth=1)
        ax.set_yticks(range(len(domains)), domains)
        ax.invert_yaxis()
        base = str(intervals[0].get("baseline", "baseline")) if intervals else "baseline"
        ax.set_xlabel(f"loss - {base} loss per held-out segment (mean, 95% paired bootstrap interval)")
        fig.legend(loc="outside lower center", ncols=2, fontsize="small", frameon=False)
        return _png(fig)

