"""``ifp-compile prune``: Adapt-Pruner from the command line, one statically pruned model out.

The output directory (written to a temporary sibling and renamed into place, so a failed
or killed run leaves nothing half-written) holds:

* ``program.pt2`` -- the specialised ExportedProgram (``torch.export.save``; loads with
  weights-only unpickling), with per-layer FFN widths and key/value heads;
* ``model.onnx`` -- the same program in ONNX (``--format onnx,pt2``);
* ``masks.safetensors`` -- ``ffn.<i>`` and ``heads.<i>`` masks, to re-specialise or to
  feed ``ifp-compile build`` as a task mask;
* ``prune.json`` -- settings, kept widths per layer, importance and sparsity per step,
  parameter counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import IFPError
from .prune import METHODS

FORMATS = ("pt2", "onnx")


def _target(text: str) -> float:
    from ..cli import fraction

    return fraction(text, high_open=True, what="the fraction of FFN channels to remove")


def _heads_target(text: str) -> float:
    from ..cli import fraction

    return fraction(text, low_open=False, high_open=True, what="the fraction of key/value heads to remove")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _positive_int, add_dtype_argument

    p.add_argument("--model", default="default",
                   help="a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--target", type=_target, required=True, help="fraction of FFN channels to remove, in (0, 1)")
    p.add_argument("--heads-target", type=_heads_target, default=0.0,
                   help="fraction of key/value heads to remove (with their query groups); default 0")
    p.add_argument("--data", required=True, help="calibration (and training) text: JSONL with {\"text\": ...} lines")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", choices=METHODS, default="taylor",
                   help="within-layer importance: taylor (default; |w * dL/dw| over coupled weights), magnitude (|w|), "
                        "activation (GRIFFIN's rule on the calibration text)")
    p.add_argument("--steps", type=_positive_int, default=5, help="pruning steps (default 5)")
    p.add_argument("--amplitude", type=float, default=0.03, help="A in s += delta - A * I (default 0.03)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="trainer steps after each pruning step (the incremental schedule; default 0)")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of that training (default 1e-5)")
    p.add_argument("--chunk-tokens", type=_positive_int, default=256, help="calibration chunk length (default 256)")
    p.add_argument("--calibration-chunks", type=_positive_int, default=8, help="calibration chunks (default 8)")
    p.add_argument("--format", default="pt2", help="comma-separated: pt2, onnx (default pt2)")
    p.add_argument("--tokenizer", choices=("model", "bytes"), default="model",
                   help="'bytes' for test models without tokenizer files")
    add_dtype_argument(p, "the model's own (float32 for GGUF and the default model)")


def prune_main(args: argparse.Namespace) -> int:
    from ..artifacts import atomic_write, dump_json, replace_dir
    from ..capture import export
    from ..passes import find_attention_blocks, find_ffn_blocks, specialize
    from ..stats import count_parameters
    from ..train.trainer import load_model_and_tokenizer
    from .incremental import calibration_chunks, trainer_hook
    from .prune import adapt_prune

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise IFPError(f"--format: unknown format(s) {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    if args.train_steps < 0:
        raise IFPError(f"--train-steps must be >= 0, got {args.train_steps}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise IFPError(f"--out {out} exists and is not a directory")
    if not Path(args.data).is_file():
        raise IFPError(f"--data {args.data}: no such file")
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, dtype=args.dtype)
    calib = calibration_chunks(args.data, tok, chunk_tokens=args.chunk_tokens, max_chunks=args.calibration_chunks)
    program = export(model, (calib[0],), dynamic_shapes="seq")
    heads = args.heads_target > 0
    if heads and not find_attention_blocks(program):
        raise IFPError("--heads-target: no attention block was recognised in this model, so only FFN channels can "
                       "be pruned (run without --heads-target); ifp_compile.attention_report(program) says what was tried")
    train = None
    if args.train_steps:
        from ..passes import insert_masks

        masked = insert_masks(program, heads=heads)
        train = trainer_hook(model, tok, program, masked, args.data, steps=args.train_steps, lr=args.lr,
                             chunk_tokens=min(128, args.chunk_tokens), seed=0, heads=heads)
    log = (lambda msg: print(f"[ifp] {msg}", file=sys.stderr))
    result = adapt_prune(program, calib, args.target, heads_target=args.heads_target, steps=args.steps,
                         amplitude=args.amplitude, method=args.method, train=train, progress=log)
    small = specialize(program, mask=result.ffn_masks, head_mask=result.head_masks)
    blocks = find_ffn_blocks(program)
    report = {
        "model": args.model, "data": str(args.data), "target": args.target, "heads_target": args.heads_target,
        "method": args.method, "steps": args.steps, "amplitude": args.amplitude, "train_steps": args.train_steps,
        "parameters": {"dense": count_parameters(program), "pruned": count_parameters(small)},
        "ffn_widths": [int(m.sum()) for m in result.ffn_masks],
        "ffn_widths_dense": [b.width for b in blocks],
        "kv_heads": [int(m.sum()) for m in result.head_masks] if result.head_masks else None,
        "importance": result.importance, "sparsity": result.sparsity, "head_sparsity": result.head_sparsity,
    }
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tensors = {f"ffn.{i}": m.contiguous() for i, m in enumerate(result.ffn_masks)}
        tensors.update({f"heads.{i}": m.contiguous() for i, m in enumerate(result.head_masks or [])})
        save_file(tensors, str(tmp / "masks.safetensors"))
        if "pt2" in formats:
            torch.export.save(small, tmp / "program.pt2")
        if "onnx" in formats:
            from ..onnx import export_onnx

            proto = export_onnx(small, name="the pruned program")
            atomic_write(tmp / "model.onnx", proto.SerializeToString())
        atomic_write(tmp / "prune.json", dump_json(report))
        replace_dir(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dense, pruned = report["parameters"]["dense"], report["parameters"]["pruned"]
    heads_note = f", kv heads per layer {report['kv_heads']}" if heads else ""
    print(f"{out}: {pruned:,} of {dense:,} parameters ({pruned / dense:.1%}); FFN widths per layer "
          f"{report['ffn_widths']}{heads_note}")
    return 0


__all__ = ["add_arguments", "prune_main"]
