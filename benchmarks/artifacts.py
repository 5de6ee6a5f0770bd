"""Per-task artifacts on SmolLM2-135M at keep 0.5, measured side by side in one run.

    python benchmarks/artifacts.py [--tasks 20] [--tokens 128]

1. a per-task ONNX artifact: ``specialize_onnx`` of the base ONNX + writing it, vs
   ``torch.onnx.export`` of the specialised program + saving it.   target: >= 20x faster
2. disk per task with the shared base vs the kept FFN bytes.      target: <= kept + 2 MB
   The same for the pt2 format (graph archive + own parameters, base parameters shared).
   A task directory copied alone (links dereferenced: ``export-task``) vs a self-contained
   specialised model of the same format.                          target: <= 1.1x
3. onnxruntime latency, specialised vs dense, 128-token prompt, vs the ideal FLOP ratio.
4. ``build`` of N mask tasks with ``--jobs 2`` vs ``--jobs 1``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from safetensors.numpy import save_file

import ifp_compile as ifp
from ifp_compile.stats import count_flops
from ifp_compile.artifacts import (
    BASE_SHARED,
    PT2_FILES,
    SHARED_FILES,
    load_artifact,
    write_task_onnx,
    write_task_pt2,
)
from ifp_compile.program_weights import ffn_parameter_names, parameters, write_parameters
from ifp_compile.build import _load_base, build
from ifp_compile.onnx import export_onnx, find_onnx_ffn_blocks, specialize_onnx
from ifp_compile.progress import status
from ifp_compile.real_model import load_smollm2


def ort_latency(path: Path, x, repeats: int = 10) -> float:
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input_ids": x.numpy()}
    for _ in range(2):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name: str, value: str, target: str = "", ok: bool | None = None) -> str:
    verdict = "" if ok is None else ("PASS" if ok else "MISS")
    return f"{name:<52} {value:>26} {target:>14} {verdict:>5}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20, help="mask tasks for the --jobs comparison (default 20)")
    ap.add_argument("--tokens", type=int, default=128, help="prompt length for the latency rows (default 128)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="ifp-bench-"))
    try:
        model, _ = load_smollm2()
        ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
        blocks = ifp.find_ffn_blocks(ep)

        def random_mask(seed):
            g = torch.Generator().manual_seed(seed)
            out = []
            for b in blocks:
                m = torch.zeros(b.width)
                m[torch.randperm(b.width, generator=g)[: b.width // 2]] = 1.0
                out.append(m)
            return out

        masks = random_mask(0)
        kept_bytes = sum(b.params_per_channel() * int(m.sum()) * 4 for b, m in zip(blocks, masks))

        # --- 1. the baseline: re-export the specialised program per task --------------
        small = ifp.specialize(ep, mask=masks)
        t0 = time.perf_counter()
        proto = export_onnx(small, name="the specialised program (baseline)")
        (work / "reexport").mkdir()
        ir.save(ir.from_proto(proto), str(work / "reexport" / "model.onnx"), external_data="weights.bin")
        t_reexport = time.perf_counter() - t0
        full_size = sum(f.stat().st_size for f in (work / "reexport").iterdir())

        # --- the base, once, then a build of one task ---------------------------------
        save_file({f"ffn.{i}": m.numpy() for i, m in enumerate(masks)}, str(work / "m0.safetensors"))
        (work / "one.jsonl").write_text(json.dumps({"name": "t0", "mask": "m0.safetensors"}) + "\n")
        t0 = time.perf_counter()
        build("default", work / "one.jsonl", work / "out")
        t_first = time.perf_counter() - t0  # includes loading + exporting the base once
        base = _load_base(work / "out" / "base" / "model.onnx")  # memory-mapped (the file is hard-linked)
        assert len(find_onnx_ffn_blocks(base)) == len(blocks)
        base_manifest = json.loads((work / "out" / "base" / "manifest.json").read_text())
        base_table, base_sha = base_manifest["tensors"], base_manifest["files"]["shared.bin"]
        task_times = []
        for i in range(5):
            t0 = time.perf_counter()
            s = specialize_onnx(base, masks)
            d = work / f"direct{i}"
            d.mkdir()
            write_task_onnx(s, d, work / "out" / "base", base_table, base_sha)  # as build does
            task_times.append(time.perf_counter() - t0)
        t_task = statistics.median(task_times)
        task_dir = work / "out" / "tasks" / "t0"
        own = sum(f.stat().st_size for f in task_dir.iterdir() if f.name not in SHARED_FILES)
        t0 = time.perf_counter()
        ifp.export_task(work / "out", "t0", work / "shipped-onnx")
        t_export = time.perf_counter() - t0
        shipped_onnx = sum(f.stat().st_size for f in (work / "shipped-onnx").iterdir())

        # --- 2b. the pt2 format: self-contained archive vs graph + own parameters ----------
        t0 = time.perf_counter()
        torch.export.save(small, str(work / "full.pt2"))
        t_pt2_full = time.perf_counter() - t0
        pt2_full_size = (work / "full.pt2").stat().st_size
        (work / "pt2base").mkdir()
        ffn_names = ffn_parameter_names(ep)
        pt2_base_sha = write_parameters({k: t for k, t in parameters(ep).items() if k not in ffn_names},
                                        work / "pt2base" / BASE_SHARED)
        pt2_times = []
        for i in range(3):
            d = work / f"pt2task{i}"
            d.mkdir()
            t0 = time.perf_counter()
            write_task_pt2(ifp.specialize(ep, mask=masks), ep, d, work / "pt2base", pt2_base_sha, ffn_names)
            pt2_times.append(time.perf_counter() - t0)
        t_pt2 = statistics.median(pt2_times)
        # a pt2-only build of the same task (from the program saved as .pt2: no reload):
        # its task directory as a build system gets it, mask and manifest included
        torch.export.save(ep, str(work / "model.pt2"))
        build(str(work / "model.pt2"), work / "one.jsonl", work / "out-pt2", formats=("pt2",))
        pt2_dir = work / "out-pt2" / "tasks" / "t0"
        pt2_own = sum(f.stat().st_size for f in pt2_dir.iterdir() if f.name not in SHARED_FILES)
        pt2_graph = (work / "pt2task0" / PT2_FILES["program"]).stat().st_size
        ifp.export_task(work / "out-pt2", "t0", work / "shipped-pt2")
        shipped_pt2 = sum(f.stat().st_size for f in (work / "shipped-pt2").iterdir())

        # --- 3. onnxruntime latency -----------------------------------------------------
        x = torch.randint(0, 1000, (1, args.tokens))
        lat_dense = ort_latency(work / "out" / "base" / "model.onnx", x)
        lat_small = ort_latency(task_dir / "model.onnx", x)
        ideal = count_flops(ep.module(), x) / count_flops(small.module(), x)
        sess = ort.InferenceSession(str(task_dir / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input_ids": x.numpy()})[0]
        with torch.no_grad():
            ref = small.module()(x).numpy()
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        with torch.no_grad():
            pt2_err = float((load_artifact(pt2_dir, format="pt2").module()(x) - small.module()(x)).abs().max())

        # --- 4. N tasks, --jobs 1 vs 2 --------------------------------------------------
        lines = []
        for i in range(args.tasks):
            save_file({f"ffn.{j}": m.numpy() for j, m in enumerate(random_mask(100 + i))}, str(work / f"m{100 + i}.safetensors"))
            lines.append(json.dumps({"name": f"task{i:02d}", "mask": f"m{100 + i}.safetensors"}))
        (work / "many.jsonl").write_text("\n".join(lines) + "\n")
        job_times = {}
        onnx_model = work / "onnx-model"  # the base as a plain ONNX model (own copy, no hard links)
        onnx_model.mkdir()
        for f in ("model.onnx", "shared.bin", "ffn.bin"):
            shutil.copyfile(work / "out" / "base" / f, onnx_model / f)
        for jobs in (1, 2):
            out = work / f"many{jobs}"
            with status(f"building {args.tasks} tasks with --jobs {jobs}"):
                t0 = time.perf_counter()
                build(str(onnx_model / "model.onnx"), work / "many.jsonl", out, jobs=jobs)
                job_times[jobs] = time.perf_counter() - t0
        same = all((work / "many1" / "tasks" / f"task{i:02d}" / "ffn.bin").read_bytes()
                   == (work / "many2" / "tasks" / f"task{i:02d}" / "ffn.bin").read_bytes() for i in range(args.tasks))

        print()
        print(f"SmolLM2-135M-Instruct, keep 0.5 (random masks), torch {torch.__version__}, onnxruntime {ort.__version__}")
        print(f"specialised ONNX vs torch specialised program on {args.tokens} tokens: max|diff|/max|logit| = {err:.1e}")
        print(f"pt2 task (load_artifact: graph + own + base parameters) vs the specialised program: max|diff| = {pt2_err}")
        print()
        print(row("measure", "value", "target"))
        print("-" * 100)
        print(row("torch.onnx.export of the specialised program + save", f"{t_reexport:.2f} s"))
        print(row("specialize_onnx + write + sha256 of a task (median of 5)", f"{t_task:.3f} s"))
        speed = t_reexport / t_task
        print(row("  speedup", f"{speed:.0f}x", ">= 20x", speed >= 20))
        print(row("first build (load, export base to ONNX once, 1 task)", f"{t_first:.1f} s"))
        print(row("full ONNX copy per task (graph + all weights)", f"{full_size / 2**20:.1f} MiB"))
        print(row("kept FFN bytes of a task", f"{kept_bytes / 2**20:.1f} MiB"))
        print(row("disk per task with the shared base (own files)", f"{own / 2**20:.1f} MiB"))
        print(row("  own - kept FFN bytes", f"{(own - kept_bytes) / 2**20:.2f} MiB", "<= 2 MiB", own - kept_bytes <= 2 * 2**20))
        print(row("pt2: torch.export.save of the specialised program", f"{t_pt2_full:.2f} s"))
        print(row("pt2: specialize + write a task (median of 3)", f"{t_pt2:.2f} s"))
        print(row("pt2: self-contained archive per task", f"{pt2_full_size / 2**20:.1f} MiB"))
        print(row("pt2: disk per task with the shared base (own files)", f"{pt2_own / 2**20:.1f} MiB"))
        print(row("  of which the weightless graph archive", f"{pt2_graph / 2**20:.2f} MiB"))
        print(row("  own - kept FFN bytes", f"{(pt2_own - kept_bytes) / 2**20:.2f} MiB", "<= 2 MiB",
                  pt2_own - kept_bytes <= 2 * 2**20))
        print(row("task copied alone (export-task, ONNX), whole dir", f"{shipped_onnx / 2**20:.1f} MiB"))
        print(row("  / full ONNX copy of the specialised model", f"{shipped_onnx / full_size:.3f}x", "<= 1.1x",
                  shipped_onnx <= 1.1 * full_size))
        print(row("  export-task time (copy + sha256 of the copy)", f"{t_export:.2f} s"))
        print(row("task copied alone (export-task, pt2), whole dir", f"{shipped_pt2 / 2**20:.1f} MiB"))
        print(row("  / self-contained pt2 archive", f"{shipped_pt2 / pt2_full_size:.3f}x", "<= 1.1x",
                  shipped_pt2 <= 1.1 * pt2_full_size))
        print(row(f"onnxruntime {args.tokens}-token prompt, dense", f"{1e3 * lat_dense:.1f} ms"))
        print(row(f"onnxruntime {args.tokens}-token prompt, specialised", f"{1e3 * lat_small:.1f} ms"))
        print(row("  speedup vs ideal FLOP ratio", f"{lat_dense / lat_small:.3f}x / {ideal:.3f}x = "
                  f"{lat_dense / lat_small / ideal:.2f}"))
        print("(the --jobs rows build from the base as an ONNX file, including writing its base once)")
        print(row(f"build {args.tasks} tasks, --jobs 1", f"{job_times[1]:.1f} s"))
        print(row(f"build {args.tasks} tasks, --jobs 2", f"{job_times[2]:.1f} s"))
        print(row("  --jobs 2 speedup (identical files: " + ("yes" if same else "NO") + ")",
                  f"{job_times[1] / job_times[2]:.2f}x"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
