"""Rendering a :class:`ReportData` as one self-contained HTML page.

Self-contained means the file can be mailed or attached to a CI run and still open
offline: figures are ``data:`` URIs, the style sheet is inline, nothing is fetched. The
page is a pure function of the data (no timestamps, fixed ordering), so re-running the
report on an unchanged directory does not produce a diff.
"""

from __future__ import annotations

import base64
import json
import math
from html import escape

import numpy as np

from . import figures
from .data import ReportData
from .overlap import MAX_SHOWN, describe, shown_labels

SPEED_COMMAND = "python benchmarks/decode.py --json DIR/speed.json"

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.0em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f3f3f3; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.scroll { overflow-x: auto; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; }
"""


# --------------------------------------------------------------------------------------
# cells and tables
# --------------------------------------------------------------------------------------
def fmt(v, digits: int | None = None) -> str:
    """A JSON value as a table cell: thousands separators, a few significant digits."""
    if v is None:
        return "\u2013"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if digits is not None:
            return f"{v:.{digits}f}"
        if v.is_integer() and abs(v) < 1e15:
            return f"{v:,.1f}"
        return f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(", ", ": "))
    return str(v)


def _numeric(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def table(headers: list[str] | None, rows: list[list], numeric: list[bool] | None = None) -> str:
    """``rows`` of pre-formatted strings (or JSON values, formatted here) as an HTML table;
    no ``headers``: a key/value table."""
    out = ['<div class="scroll"><table>']
    if headers:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            right = numeric[i] if numeric is not None else _numeric(v)
            cells.append(f'<td class="n">{escape(fmt(v))}</td>' if right else f"<td>{escape(fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def image(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def para(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"


# --------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------
def _header(data: ReportData) -> str:
    what = "build" if data.kind == "build" else "eval"
    return "\n".join([f"<h1>ifp-compile report: {escape(data.directory.name or str(data.directory))} ({what})</h1>",
                      table(None, [[k, v] for k, v in data.facts], numeric=[False, False])])


def _kept_section(data: ReportData) -> str:
    labels = shown_labels([k.label for k in data.kept])
    kept = [k for k in data.kept if k.label in labels]
    total = sum(data.widths)
    shares = [sum(k.per_layer) / total for k in data.kept]
    per_layer = np.mean([np.asarray(k.per_layer) / np.asarray(data.widths) for k in data.kept], axis=0)
    lo, hi = int(np.argmin(per_layer)), int(np.argmax(per_layer))
    text = (f"Tasks keep {min(shares):.1%} to {max(shares):.1%} of the {total:,} dense FFN channels. Averaged over "
            f"tasks, layer {lo} keeps the smallest share ({per_layer[lo]:.1%}) and layer {hi} the largest "
            f"({per_layer[hi]:.1%}).")
    parts = ["<h2>Kept FFN width per layer</h2>", para(text)]
    if len(kept) < len(data.kept):
        parts.append(para(f"{len(data.kept)} tasks: the figure draws the first {MAX_SHOWN} by name; the table lists "
                          "all of them.", "note"))
    if data.same_masks:
        parts.append(para("Tasks with identical masks (their lines coincide): "
                          + "; ".join(" = ".join(g) for g in data.same_masks) + ".", "note"))
    parts.append(image(figures.kept_width_png(data, kept), "kept FFN channels per layer for each task"))
    layers = [f"{i}" for i in range(len(data.widths))]
    rows = [["dense", _count(total)] + [_count(w) for w in data.widths]]
    rows += [[k.label, _count(sum(k.per_layer))] + [_count(v) for v in k.per_layer] for k in data.kept]
    parts.append(para("Kept channels per layer (columns: layer index)" +
                      ("; eval rows: mean over the masked examples of the domain." if data.kind == "eval" else "."),
                      "note"))
    parts.append(table(["task", "total"] + layers, rows, numeric=[False] + [True] * (len(layers) + 1)))
    return "\n".join(parts)


def _count(v: float) -> str:
    """A channel count: whole numbers as such, means over examples with one decimal."""
    return f"{int(v):,}" if float(v).is_integer() else f"{v:,.1f}"


def _overlap_section(data: ReportData) -> str:
    parts = ["<h2>Task-by-task mask overlap per layer</h2>",
             para("Overlap is the Jaccard index |A\u2229B| / |A\u222aB| of two tasks' kept-channel sets "
                  "(1 = the same channels, 0 = disjoint).")]
    if data.kind == "eval":
        parts.append(para("Eval directory: a task is a domain. Entry (i, j) is the mean overlap over every pair "
                          "(example of domain i, example of domain j); the diagonal uses pairs of distinct examples "
                          "of one domain (grey where a domain has a single example). Static and dense rows have "
                          "one mask for everything and are not compared.", "note"))
    for o in data.overlaps:
        title = f"mask overlap per layer: {o.name}" if data.kind == "eval" else "mask overlap per layer between tasks"
        parts.append(f"<h3>{escape(o.name if data.kind == 'eval' else 'Overlap matrices')}</h3>")
        if o.truncated:
            parts.append(para(f"{len(o.labels)} tasks: the heatmaps show only the first {MAX_SHOWN} by name; the "
                              "means below use all of them.", "note"))
        if len(o.shown) > figures.TICKS_UP_TO:
            parts.append(para("Rows and columns, in order: " + ", ".join(o.shown) + ".", "note"))
        parts.append(image(figures.heatmap_grid_png(o, title), f"overlap heatmaps per layer: {o.name}"))
    if not data.overlaps:
        parts.append(para("No per-task masks in this directory: nothing to compare.", "note"))
        return "\n".join(parts)
    parts.append("<h3>Overlap against depth</h3>")
    parts.append(image(figures.overlap_lines_png(data.overlaps), "mean overlap per layer"))
    parts += [para(s) for s in (describe(o) for o in data.overlaps) if s]
    headers, columns = ["layer"], []
    for o in data.overlaps:
        prefix = f"{o.name}: " if data.kind == "eval" else ""
        headers.append(prefix + "cross-task")
        columns.append(o.cross)
        if o.within is not None:
            headers.append(prefix + "within-task")
            columns.append(o.within)
    rows = [[str(i)] + [fmt(float(c[i]), 3) for c in columns] for i in range(len(data.widths))]
    parts.append(para("Mean overlap per layer: cross-task = over pairs of different tasks"
                      + ("; within-task = over pairs of distinct examples of one domain." if data.kind == "eval"
                         else "."), "note"))
    parts.append(table(headers, rows, numeric=[True] * len(headers)))
    return "\n".join(parts)


def _quality_build(data: ReportData) -> str:
    total = sum(data.widths)
    keys = [k for k in ("pt2_parameters", "onnx_initializer_scalars")
            if any(k in t["parameters"] for t in data.tasks.values())]
    headers = ["task", "kept channels", "kept share"] + [k.replace("_", " ") for k in keys] + ["instruction"]
    rows = []
    for name, t in data.tasks.items():
        kept = sum(t["kept"])
        rows.append([name, f"{kept:,} / {total:,}", f"{kept / total:.1%}"]
                    + [fmt(t["parameters"].get(k)) for k in keys] + [t["instruction"] or "(mask file)"])
    numeric = [False, True, True] + [True] * len(keys) + [False]
    return "\n".join(["<h2>Tasks</h2>", table(headers, rows, numeric)])


def _gap_table(summary: list[dict]) -> tuple[str, list[str]]:
    """The summary list pivoted to rows x (domain, metric) columns, and a sentence per row."""
    columns: list[str] = []
    by_row: dict[str, dict[str, object]] = {}
    for s in summary:
        metric = s.get("metric")
        col = str(s.get("domain", "")) + ("" if metric in (None, "loss") else f" ({metric})")
        if col not in columns:
            columns.append(col)
        by_row.setdefault(str(s.get("row", "")), {})[col] = s.get("gap_closed")
    rows, sentences = [], []
    for name, cells in by_row.items():
        values = [cells.get(c) for c in columns]
        rows.append([name] + ["n/a" if not _numeric(v) else f"{v:+.1%}" for v in values])
        losses = [cells[c] for c in columns if "(" not in c and _numeric(cells.get(c))]
        if losses:
            sentences.append(f"{name} closes on average {sum(losses) / len(losses):+.1%} of the static-to-dense "
                             f"loss gap over {len(losses)} domain(s).")
    return table(["row"] + columns, rows, numeric=[False] + [True] * len(columns)), sentences


def _quality_eval(data: ReportData) -> str:
    ev = data.evaluation
    domains = ev.get("domains") or sorted({d for r in ev["rows"] for d in (r.get("loss") or {})})
    dense = next((r.get("parameters") for r in ev["rows"] if r["kind"] == "dense"), None)
    headers = ["row", "kind", "parameters"] + (["of dense"] if _numeric(dense) and dense else [])
    headers += [f"{d} loss" for d in domains] + ["math accuracy"]
    rows = []
    for r in ev["rows"]:
        p = r.get("parameters")
        cells = [r["name"], r["kind"], fmt(p)]
        if "of dense" in headers:
            cells.append(f"{p / dense:.1%}" if _numeric(p) else "\u2013")
        loss = r.get("loss") or {}
        cells += [fmt(float(loss[d]), 3) if _numeric(loss.get(d)) else "\u2013" for d in domains]
        acc = r.get("math_accuracy")
        cells.append(f"{acc:.1%}" if _numeric(acc) else "\u2013")
        rows.append(cells)
    numeric = [False, False] + [True] * (len(headers) - 2)
    parts = ["<h2>Quality</h2>",
             para("Held-out loss per domain (lower is better) and math exact-match accuracy of every row.", "note"),
             table(headers, rows, numeric)]
    summary = ev.get("summary")
    if summary:
        gap, sentences = _gap_table(summary)
        parts += ["<h3>Share of the static-to-dense gap closed</h3>",
                  para("1 (100%) = as good as dense, 0 = no better than the static mask, negative = worse.", "note"),
                  gap] + [para(s) for s in sentences]
    intervals = [iv for iv in ev.get("intervals") or [] if isinstance(iv, dict)
                 and all(_numeric(iv.get(k)) for k in ("mean", "low", "high"))]
    for base in dict.fromkeys(str(iv.get("baseline", "the baseline")) for iv in intervals):
        group = [iv for iv in intervals if str(iv.get("baseline", "the baseline")) == base]
        parts += [f"<h3>Against {escape(base)}, with 95% intervals</h3>",
                  para(f"Per held-out segment, each row's loss minus {base}'s (negative: the row is better); "
                       "the bar is the paired bootstrap 95% interval of the mean. An interval that does not "
                       "cross 0 is a difference beyond the luck of which segments were drawn.", "note"),
                  image(figures.intervals_png(group), f"loss differences against {base} with 95% intervals"),
                  table(["row", "domain", "mean difference", "95% interval", "segments"],
                        [[str(iv["row"]), str(iv["domain"]), f"{iv['mean']:+.4f}",
                          f"[{iv['low']:+.4f}, {iv['high']:+.4f}]" + (" *" if iv.get("excludes_zero") else ""),
                          fmt(iv.get("n"))] for iv in group], [False, False, True, False, True])]
    swap = ev.get("swap") or {}
    wins = ev.get("swap_diagonal_wins") or {}
    for name, matrix in swap.items():
        if not isinstance(matrix, dict) or not matrix:
            continue
        doms = list(matrix)
        rows_ = []
        for d in doms:
            cells = matrix.get(d) or {}
            rows_.append([str(d)] + [fmt(float(cells[e]), 3) if _numeric(cells.get(e)) else "\u2013" for e in doms]
                         + ["yes" if (wins.get(name) or {}).get(d) else "no"])
        parts += [f"<h3>Task swap: {escape(str(name))}</h3>",
                  para("Loss on each domain's held-out segments (rows) with the masks this row chose for each "
                       "domain's segments (columns). If the input conditions the mask usefully, each row's own "
                       "domain (the diagonal) gives the lowest loss.", "note"),
                  table(["segments of"] + [f"{e} masks" for e in doms] + ["own masks win"], rows_,
                        [False] + [True] * len(doms) + [False])]
    return "\n".join(parts)


def _speed_section(data: ReportData) -> str:
    parts = ["<h2>Speed</h2>"]
    if data.speed is None:
        parts.append(para(f"No speed data was given (--speed FILE, or {data.directory}/speed.json). "
                          f"The decode benchmark writes it: {SPEED_COMMAND}"))
        return "\n".join(parts)
    parts.append(para(f"From {data.speed_source}.", "note"))
    scalars, tables = [], []
    for key, value in data.speed.items():
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            tables.append((key, value))
        else:
            scalars.append([key, value])
    if scalars:
        parts.append(table(None, scalars, numeric=[False, False]))
    for key, items in tables:
        columns = list(dict.fromkeys(c for item in items for c in item))
        rows = [[item.get(c, "") for c in columns] for item in items]
        parts += [f"<h3>{escape(str(key))}</h3>", table([str(c) for c in columns], rows)]
    return "\n".join(parts)


def render(data: ReportData) -> str:
    quality = _quality_build(data) if data.kind == "build" else _quality_eval(data)
    body = [_header(data), _kept_section(data), _overlap_section(data), quality, _speed_section(data)]
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f"<title>ifp-compile report: {escape(str(data.directory))}</title>",
                      f"<style>{STYLE}</style>", "</head>", "<body>", *body, "</body>", "</html>", ""])
