"""``ifp-compile eval``: is a per-task model as good as the dense one, and better than a
static model of the same size? One table, every row on the same held-out data."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from ..errors import IFPError

STATIC = ("adapt", "magnitude")
STATIC_SCORES = ("taylor", "activation", "magnitude")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _positive_int, add_dtype_argument, fraction

    p.add_argument("--model", default="default",
                   help="a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--keep", type=fraction, default=0.5, help="fraction of FFN channels kept (default 0.5)")
    p.add_argument("--predictor", help="a trained IFPredictor checkpoint directory (ifp-compile train): adds its row")
    p.add_argument("--static", choices=STATIC, default="adapt",
                   help="the static row: Adapt-Pruner (default) or uniform magnitude pruning")
    p.add_argument("--static-score", choices=STATIC_SCORES, default="activation",
                   help="Adapt-Pruner's within-layer score (default activation: the strongest static "
                   "baseline on SmolLM2, see docs/results.md)")
    p.add_argument("--segments", type=_positive_int, default=12,
                   help="held-out segments of 256 tokens per domain (default 12)")
    p.add_argument("--problems", type=int, default=20, help="held-out math problems to answer (default 20; 0 = skip)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="answer length limit (default 64)")
    p.add_argument("--calibration-chunks", type=_positive_int, default=6,
                   help="256-token chunks of training text for the static mask (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-mask row (default 0)")
    p.add_argument("--swap", action="store_true",
                   help="also the task-swap matrix of every per-task row: each domain's segments with the masks "
                   "chosen for every other domain's (the diagonal should win if the input matters)")
    p.add_argument("--out", help="also write DIR/eval.json and DIR/masks.safetensors (for ifp-compile report)")
    p.add_argument("--tokenizer", choices=("model", "bytes"), default="model",
                   help="'bytes' for test models without tokenizer files")
    add_dtype_argument(p, "the model's own (float32 for GGUF and the default model)")


def _predictor_source(path: str, widths: list[int], counts: list[int]):
    from ..train import config_from_dict, load_trained, setup
    from ..train.checkpoint import read_state
    from .rows import ifpredictor_source

    ck = Path(path)
    state = read_state(ck)
    cfg = config_from_dict(state["config"], where=f"{ck}/state.json")
    s = setup(cfg)
    if s.widths != widths:
        raise IFPError(f"--predictor {ck}: trained for a model with FFN widths {s.widths[:4]}..., "
                       f"the evaluated model has {widths[:4]}... (a checkpoint of another model?)")
    predictor = load_trained(ck, s)
    if predictor.counts != counts:
        raise IFPError(f"--predictor {ck} keeps {sum(predictor.counts)} channels in total, --keep keeps "
                       f"{sum(counts)}: pass the --keep it was trained with, so every row has the same size")
    return ifpredictor_source(predictor, (ck / "llm.safetensors").is_file(), s.model, s.program)


def eval_main(args: argparse.Namespace) -> int:
    from safetensors.numpy import save

    from ..artifacts import atomic_write, dump_json, replace_dir
    from ..capture import export
    from ..passes import find_ffn_blocks
    from ..predictors.base import keep_counts
    from ..progress import status
    from ..train.trainer import load_model_and_tokenizer
    from .rows import prompt_activation_source, random_source, static_source
    from .run import calibration, run_eval

    if args.problems < 0:
        raise IFPError(f"--problems must be >= 0, got {args.problems}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        raise IFPError(f"--out {out} exists and is not a directory")
    if args.predictor and not Path(args.predictor).is_dir():
        raise IFPError(f"--predictor {args.predictor}: no such checkpoint directory")
    model, tok = load_model_and_tokenizer(args.model, args.tokenizer, dtype=args.dtype)
    with status("exporting the model"):
        program = export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    widths = [b.width for b in find_ffn_blocks(program)]
    counts = keep_counts(widths, args.keep)
    log = (lambda msg: print(f"[ifp] {msg}", file=sys.stderr))
    with status(f"static mask ({args.static})"):
        calib = calibration(tok, args.calibration_chunks)
        sources = [static_source(program, calib, args.keep, args.static, args.static_score, progress=log)]
    sources.append(prompt_activation_source(program, counts))
    if args.predictor:
        sources.append(_predictor_source(args.predictor, widths, counts))
    sources.append(random_source(widths, counts, args.seed))
    result = run_eval(model, tok, program, sources, model_name=args.model, keep=args.keep, segments=args.segments,
                      problems=args.problems, max_new_tokens=args.max_new_tokens, swap=args.swap)
    print(f"{args.model}: keep {args.keep} of FFN channels; held-out loss on tokens 64-256 of {args.segments} "
          f"segments per domain (per-task masks read tokens 0-64); math: exact match of the final number over "
          f"{args.problems} held-out problems, answered with the chat template")
    print(result.table())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            if out.is_dir():  # keep what else lives there (a report, speed.json)
                for f in sorted(out.iterdir()):
                    if f.is_file() and f.name not in ("eval.json", "masks.safetensors"):
                        (tmp / f.name).write_bytes(f.read_bytes())
            atomic_write(tmp / "masks.safetensors", save(result.mask_tensors()))
            atomic_write(tmp / "eval.json", dump_json({**result.to_json(), "seconds": round(result.seconds, 1)}))
            replace_dir(tmp, out)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"wrote {out}/eval.json and {out}/masks.safetensors (ifp-compile report {out} draws them)")
    return 0
