"""``ifp-compile report DIR``: one self-contained HTML page about a build or an eval directory.

The page shows what the masks do per layer -- how wide each task's FFN stays, and how
much tasks' kept channels overlap, which is the paper's "shared early, task-specific
late" question -- next to the quality (eval) or size (build) numbers, and decode speed
when a benchmark JSON is given. It embeds every figure, so it opens offline and can be
attached to a CI run; the same directory always gives the same bytes.

    from ifp_compile.report import write_report
    write_report("out/eval", speed="out/eval/speed.json")   # -> out/eval/report.html
"""

from __future__ import annotations

from pathlib import Path

from .data import ReportData, ReportError, load_report_data
from .overlap import Overlap

REPORT_FILE = "report.html"


def write_report(directory, out=None, speed=None) -> Path:
    """Read ``directory``, render the page and write it atomically; returns its path.

    ``out`` defaults to ``directory/report.html``; ``speed`` to ``directory/speed.json``
    when that exists. Every bad input raises :class:`ReportError` before anything is
    written, and a failed write leaves no partial file.
    """
    from ..artifacts import atomic_write
    from .html import render

    out = Path(out) if out is not None else Path(directory) / REPORT_FILE
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory; give a file name such as {out / REPORT_FILE}")
    page = render(load_report_data(directory, speed)).encode()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, page)
    except OSError as e:
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            tmp.unlink(missing_ok=True)
        raise ReportError(f"writing {out} failed: {e.strerror or e}") from None
    return out


__all__ = ["REPORT_FILE", "Overlap", "ReportData", "ReportError", "load_report_data", "write_report"]
