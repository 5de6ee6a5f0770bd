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


def _budgets():
    from .controls import QUICK, Budget

    return Budget(), QUICK


DEFAULT_BUDGET, QUICK_BUDGET = _budgets()


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _positive_float, _positive_int, add_dtype_argument, fraction

    p.add_argument("--model", default="default",
                   help="a Hugging Face model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--keep", type=fraction, default=0.5, help="fraction of FFN channels kept (default 0.5)")
    p.add_argument("--predictor", help="a trained IFPredictor checkpoint directory (ifp-compile train): adds its row")
    p.add_argument("--static", choices=STATIC, default="adapt",
                   help="the static row: Adapt-Pruner (default) or uniform magnitude pruning")
    p.add_argument("--static-score", choices=STATIC_SCORES, default="activation",
                   help="Adapt-Pruner's within-layer score (default activation: the strongest static "
                   "baseline on SmolLM2, see docs/results.md)")
    p.add_argument("--segments", type=_positive_int, default=None,
                   help="held-out segments of up to 256 tokens per domain (default 100; 4 with --quick)")
    p.add_argument("--problems", type=int, default=None,
                   help="held-out math problems to answer (default 20, 0 with --controls; 0 = skip)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="answer length limit (default 64)")
    p.add_argument("--calibration-chunks", type=_positive_int, default=6,
                   help="256-token chunks of training text for the static mask (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-mask row (default 0)")
    p.add_argument("--swap", action="store_true",
                   help="also the task-swap matrix of every per-task row: each domain's segments with the masks "
                   "chosen for every other domain's (the diagonal should win if the input matters)")
    p.add_argument("--swap-segments", type=_positive_int, default=None,
                   help="score the swap matrices on each domain's first N segments (default all; 3 with --quick)")
    g = p.add_argument_group("equal-budget controls (issue 19)")
    g.add_argument("--controls", action="store_true",
                   help="train and add the equal-budget rows: a static learned mask, the static calibrated set with "
                   "learned scales, a per-task and a per-input predictor (each LLM-frozen and, with --joint all, "
                   "trained jointly with the LLM); intervals are then against the static learned mask")
    g.add_argument("--joint", choices=("none", "all"), default="all",
                   help="with --controls: also train every control jointly with the LLM (default all)")
    g.add_argument("--train-steps", type=_positive_int, default=None,
                   help=f"with --controls: training steps of 4 examples per row (default {DEFAULT_BUDGET.steps}; "
                   f"{QUICK_BUDGET.steps} with --quick)")
    g.add_argument("--train-texts", type=_positive_int, default=None,
                   help=f"with --controls: training records per domain (default {DEFAULT_BUDGET.texts_per_domain}; "
                   f"{QUICK_BUDGET.texts_per_domain} with --quick)")
    g.add_argument("--control-kinds", metavar="KIND[,KIND]",
                   help="with --controls: train only these controls (of static-learned, static-scales, per-task, "
                   "per-input; static-learned is required), e.g. for a longer or hotter run of the two that matter")
    g.add_argument("--temperature", type=_positive_float, default=None,
                   help="with --controls: the predictors' SoftTopK temperature (default 1.0; higher = softer masks "
                   "while training)")
    g.add_argument("--encoder-layers", type=_positive_int, default=4,
                   help="with --controls: the predictors' encoder = the model's first N layers (default 4)")
    g.add_argument("--work", help="with --controls: where training data and checkpoints go (default OUT.controls beside "
                   "--out, or a temporary directory); a finished or interrupted row resumes from there")
    g.add_argument("--quick", action="store_true",
                   help="the same pipeline at a tiny budget (4 segments, swap on 3, 4 training steps, 8 records per "
                   "domain, 2 calibration chunks): under 10 minutes on SmolLM2 on 2 cores, for tests and smoke "
                   "runs; its numbers mean nothing")
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


def _train_controls(args, out: Path | None, log):
    from dataclasses import replace

    from ..dtypes import name as dtype_name
    from .controls import select, train_controls

    controls = select(args.control_kinds)
    base = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    budget = replace(base, steps=args.train_steps or base.steps, texts_per_domain=args.train_texts or base.texts_per_domain,
                     keep=args.keep, seed=args.seed, encoder_layers=args.encoder_layers,
                     temperature=args.temperature or base.temperature,
                     tokenizer="bytes" if args.tokenizer == "bytes" else None,
                     dtype=None if args.dtype is None else dtype_name(args.dtype))  # the config is JSON
    if args.work:
        work = Path(args.work)
    elif out is not None:  # beside OUT, not in it: OUT is replaced whole when written
        work = out.with_name(out.name + ".controls")
    else:
        work = Path(tempfile.mkdtemp(prefix="ifp-controls-"))
    if work.exists() and not work.is_dir():
        raise IFPError(f"--work {work} exists and is not a directory")
    log(f"controls: training data and checkpoints in {work}")
    return train_controls(args.model, work, budget, (False, True) if args.joint == "all" else (False,), log=log,
                          controls=controls)


def _control_sources(trained):
    from .controls import sources

    return sources(trained)


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

    quick = args.quick
    if args.segments is None:
        args.segments = 4 if quick else 100
    if quick and args.swap_segments is None:
        args.swap_segments = 3
    if args.problems is None:
        args.problems = 0 if (quick or args.controls) else 20
    if args.problems < 0:
        raise IFPError(f"--problems must be >= 0, got {args.problems}")
    if quick:
        args.calibration_chunks = min(args.calibration_chunks, 2)
    if not args.controls and any(v is not None for v in (args.train_steps, args.train_texts, args.work,
                                                         args.control_kinds, args.temperature)):
        raise IFPError("--train-steps, --train-texts, --work, --control-kinds and --temperature need --controls")
    if args.controls:
        from .controls import select

        select(args.control_kinds)  # a bad name fails before the model loads
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
    swap_kinds = None
    if args.controls:
        trained = _train_controls(args, out, log)
        sources += _control_sources(trained)
        swap_kinds = {s.kind for s in sources if s.kind.startswith(("per-task", "per-input"))}
    sources.append(random_source(widths, counts, args.seed))
    result = run_eval(model, tok, program, sources, model_name=args.model, keep=args.keep, segments=args.segments,
                      problems=args.problems, max_new_tokens=args.max_new_tokens, swap=args.swap,
                      swap_segments=args.swap_segments, swap_kinds=swap_kinds)
    print(f"{args.model}: keep {args.keep} of FFN channels; held-out loss on tokens 64-256 of {args.segments} "
          f"segments per domain (per-input masks read tokens 0-64; docstring: the loss is on the docstring, masks "
          f"read the instruction and the function); " + (
              f"math: exact match of the final number over {args.problems} held-out problems, answered with "
              f"the chat template" if args.problems else "math exact match: not run (--problems 0)"))
    if args.controls:
        from .controls import verdict_lines

        print("\n".join(verdict_lines(result.to_json())))
        for t in trained:
            print(f"  trained {t.kind}: {len(t.losses)} steps, training loss "
                  f"{t.losses[0]:.3f} -> {t.final_loss():.3f} (mean of the last {min(20, len(t.losses))})")
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
            extra = {"seconds": round(result.seconds, 1)}
            if args.controls:
                from .controls import verdict

                extra.update(verdict=verdict(result.to_json()),
                             training={t.kind: {"steps": len(t.losses), "seconds": round(t.seconds, 1),
                                                "first_loss": t.losses[0], "last20_loss": t.final_loss()}
                                       for t in trained})
            atomic_write(tmp / "eval.json", dump_json({**result.to_json(), **extra}))
            replace_dir(tmp, out)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
        print(f"wrote {out}/eval.json and {out}/masks.safetensors (ifp-compile report {out} draws them)")
    return 0
