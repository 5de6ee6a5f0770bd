"""Joint training (predictor + LLM) in float32, bfloat16 and float16, side by side.

    python benchmarks/half_training.py [--model default] [--steps 4] [--dtypes fp32,bf16,fp16]

For each precision it trains the static-learned control of ``eval --controls`` (the same
data and hyper-parameters, ``llm_lr`` 1e-5) with the LLM trained, from scratch in a
temporary directory, and prints:

* the training losses (first step, last step; all finite?) and the run's wall time (static
  mask initialisation, the steps and the final checkpoint; on CPU float16 matmuls have no
  fast kernels, so expect float16 to be many times slower than bfloat16);
* how many of the LLM's weights the optimizer moved (its float32 master copies differ from
  the starting weights) and how many of the model's half-precision weights changed once the
  copies were rounded. The gap is what stepping the half weights directly would have lost:
  in bfloat16 an update below about 1/256 of the weight rounds away (docs/training.md,
  "Half precision"), and in float16 AdamW breaks at the second step.

The first step's loss in each precision is the same model at the same start, so the
bf16/fp16 losses differ from fp32's by the precision's own rounding only.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("IFP_QUIET", "1")

from ifp_compile.cli import _positive_int  # noqa: E402
from ifp_compile.dtypes import name as dtype_name  # noqa: E402
from ifp_compile.dtypes import parse_dtype  # noqa: E402
from ifp_compile.evaluation.controls import CONTROLS, Budget, config_for, training_data  # noqa: E402
from ifp_compile.errors import IFPError  # noqa: E402
from ifp_compile.train import config_from_dict, run, setup  # noqa: E402


def measure(model: str, dtype: torch.dtype, steps: int, work: Path, texts: int, tokenizer: str | None,
            encoder_layers: int) -> dict:
    data = work / "train.jsonl"
    if not data.exists():
        training_data(data, texts)
    static = next(c for c in CONTROLS if c.kind == "static-learned")
    budget = Budget(steps=steps, texts_per_domain=texts, dtype=dtype_name(dtype), tokenizer=tokenizer,
                    encoder_layers=encoder_layers)
    cfg = config_from_dict(config_for(static, True, model, data, work / dtype_name(dtype), budget))
    s = setup(cfg)
    start = {n: p.detach().clone() for n, p in s.model.named_parameters()}
    t0 = time.perf_counter()
    result = run(cfg, setup_=s)
    seconds = time.perf_counter() - t0
    from safetensors.torch import load_file

    saved = load_file(str(result.checkpoint / "llm.safetensors"))
    total = moved = changed = 0
    for n, p in s.model.named_parameters():
        total += p.numel()
        moved += int((saved[n] != start[n].to(saved[n].dtype)).sum())
        changed += int((p.detach() != start[n]).sum())
    return {"losses": result.losses, "seconds": seconds, "total": total, "moved": moved, "changed": changed,
            "saved_dtype": next(iter(saved.values())).dtype}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default (SmolLM2), an HF directory or a .gguf")
    p.add_argument("--steps", type=_positive_int, default=4, help="training steps per precision (default 4)")
    p.add_argument("--texts", type=_positive_int, default=8, help="training records per domain (default 8)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma-separated precisions (default fp32,bf16,fp16)")
    p.add_argument("--encoder-layers", type=_positive_int, default=4, help="the predictor's encoder depth (default 4)")
    p.add_argument("--tokenizer", choices=("model", "bytes"), default="model",
                   help="the model's own (default) or bytes, for a test model without tokenizer files")
    args = p.parse_args(argv)
    try:
        dtypes = [parse_dtype(d.strip()) for d in args.dtypes.split(",") if d.strip()]
    except IFPError as e:  # the message names the bad spelling
        p.error(f"--dtypes: {e}")
    print(f"{args.model}: joint training (LLM trained, llm_lr 1e-5), static-learned control, {args.steps} steps x 4 "
          f"examples per precision")
    print(f"{'dtype':<10}{'first loss':>11}{'last loss':>11}{'finite':>8}{'run s':>8}"
          f"{'master moved':>14}{'model changed':>15}  checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            try:
                r = measure(args.model, dtype, args.steps, Path(tmp), args.texts,
                            "bytes" if args.tokenizer == "bytes" else None, args.encoder_layers)
            except IFPError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            finite = all(torch.isfinite(torch.tensor(r["losses"])).tolist())
            print(f"{dtype_name(dtype):<10}{r['losses'][0]:>11.4f}{r['losses'][-1]:>11.4f}{str(finite):>8}"
                  f"{r['seconds']:>8.1f}{r['moved'] / r['total']:>14.2%}{r['changed'] / r['total']:>15.2%}  "
                  f"{str(r['saved_dtype']).removeprefix('torch.')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
