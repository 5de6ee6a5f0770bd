"""Builds of many mask tasks: what a task costs once its widths' graph is shared.

    python benchmarks/shared_graphs.py [--tasks 200] [--chunk 40] [--format onnx,pt2]
                                       [--model default] [--keep 0.5] [--compare 4] [--jobs 1]

Issue 18's target, per format: with SmolLM2 at keep 0.5 and mask tasks (random channels,
the same count per layer, so one graph for every task), the time per task of a build is
at most 1.5x the time to write that task's kept FFN bytes to the same disk
(``f.write`` + ``fsync`` of the same number of bytes, measured in the same run, in the same
directory).

How: one build makes the base and the first task (the graph passes run, the graph and
its plan are stored); then the other tasks are built ``--chunk`` at a time, each chunk one
``build()`` of its own tasks file (its wall time, mask files read, hashing and index
included), and after each chunk the same bytes are written plainly for the comparison.
Chunks are deleted after they are measured: 200 SmolLM2 tasks hold 32 GB per format,
more than these machines' disks. ``--compare K`` also builds K tasks with the graph
passes for every task (``share_graphs=False``: last session's per-task cost; the median of
their ``BuildReport.seconds``, so the model's load is not counted), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ifp_compile.artifacts import FFN_BIN, PT2_FILES
from ifp_compile.build import Source, build

OWN = {"onnx": FFN_BIN, "pt2": PT2_FILES["own"]}


def masks_for(widths: list[int], keep: float, rng) -> list[np.ndarray]:
    out = []
    for w in widths:
        m = np.zeros(w, np.float32)
        m[rng.choice(w, int(round(w * keep)), replace=False)] = 1.0
        out.append(m)
    return out


def write_tasks(d: Path, names: list[str], widths, keep, rng) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in names:
        save_file({f"ffn.{i}": m for i, m in enumerate(masks_for(widths, keep, rng))}, str(d / f"{name}.safetensors"))
        lines.append(json.dumps({"name": name, "mask": f"{name}.safetensors"}))
    path = d / f"tasks-{names[0]}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def plain_write_seconds(directory: Path, sizes: list[int]) -> float:
    """Write ``sizes`` bytes per file, as a task's weights are written (one file each, fsync)."""
    data = np.random.default_rng(0).integers(0, 255, max(sizes), dtype=np.uint8)
    t = time.perf_counter()
    for i, n in enumerate(sizes):
        with open(directory / f".plain-{i}", "wb") as f:
            f.write(memoryview(data)[:n])
            f.flush()
            os.fsync(f.fileno())
    seconds = time.perf_counter() - t
    for i in range(len(sizes)):
        (directory / f".plain-{i}").unlink()
    return seconds


def run_format(fmt: str, args, work: Path, widths: list[int]) -> dict:
    rng = np.random.default_rng(18)
    out = work / f"out-{fmt}"
    inputs = work / f"in-{fmt}"
    t = time.perf_counter()
    build(args.model, write_tasks(inputs, ["t0000"], widths, args.keep, rng), out, formats=(fmt,), jobs=args.jobs)
    first = time.perf_counter() - t
    names = [f"t{i:04d}" for i in range(1, args.tasks)]
    built_s = plain_s = 0.0
    own_bytes: list[int] = []
    for start in range(0, len(names), args.chunk):
        chunk = names[start:start + args.chunk]
        tasks = write_tasks(inputs, chunk, widths, args.keep, rng)
        t = time.perf_counter()
        report = build(args.model, tasks, out, formats=(fmt,), jobs=args.jobs)
        built_s += time.perf_counter() - t
        assert report.built == chunk and not report.failed, (report.built, report.failed)
        sizes = [(out / "tasks" / n / OWN[fmt]).stat().st_size for n in chunk]
        own_bytes += sizes
        plain_s += plain_write_seconds(out, sizes)
        for n in chunk:
            shutil.rmtree(out / "tasks" / n)
        print(f"  {fmt}: {start + len(chunk)}/{len(names)} tasks, {built_s / (start + len(chunk)):.3f} s/task, "
              f"plain write {plain_s / (start + len(chunk)):.3f} s/task", file=sys.stderr, flush=True)
    row = {"format": fmt, "tasks": args.tasks, "first_task_s": first, "per_task_s": built_s / len(names),
           "plain_write_s": plain_s / len(names), "own_mib": float(np.mean(own_bytes)) / 2**20}
    if args.compare:
        chunk = [f"p{i:04d}" for i in range(args.compare)]
        report = build(args.model, write_tasks(inputs, chunk, widths, args.keep, rng), out, formats=(fmt,),
                       jobs=1, share_graphs=False)
        # the median task: the first one also loads and exports the model (pt2)
        row["passes_per_task_s"] = float(np.median(list(report.seconds.values())))
    shutil.rmtree(out)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=200)
    p.add_argument("--chunk", type=int, default=40, help="tasks per build (each chunk is deleted once measured)")
    p.add_argument("--format", default="onnx,pt2")
    p.add_argument("--model", default="default")
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--compare", type=int, default=4, help="tasks built by the passes alone, for comparison")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--workdir", help="where to build (default: a temporary directory on the same disk as /tmp)")
    args = p.parse_args(argv)
    widths = Source(args.model, args.keep).widths()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ifp-shared-graphs-"))
    rows = []
    try:
        for fmt in args.format.split(","):
            rows.append(run_format(fmt, args, work, widths))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.model}, keep {args.keep}, {args.tasks} mask tasks, --jobs {args.jobs}")
    print(f"{'format':6} {'own MiB':>8} {'first task s':>12} {'s/task':>8} {'plain write s':>13} {'ratio':>6} "
          f"{'passes s/task':>13}")
    for r in rows:
        ratio = r["per_task_s"] / r["plain_write_s"]
        print(f"{r['format']:6} {r['own_mib']:8.1f} {r['first_task_s']:12.1f} {r['per_task_s']:8.3f} "
              f"{r['plain_write_s']:13.3f} {ratio:6.2f} {r.get('passes_per_task_s', float('nan')):13.3f}"
              f"   target ratio <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
