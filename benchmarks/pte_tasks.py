"""Per-task ExecuTorch programs of SmolLM2-135M-Instruct: tokens and decode speed.

    python benchmarks/pte_tasks.py [--keeps 0.5] [--tokens 64] [--reps 5]

Needs the ``pte`` extra (executorch) and the real model. In one run:

* the dense decode-step program and, per keep ratio, the program specialised to the mask
  the prompt-activation predictor picks for the prompt, each lowered to a ``.pte`` with
  XNNPACK (float32, static KV cache as mutable buffers): lowering time and file size;
* **tokens**: the ``.pte`` run by ExecuTorch's runtime against the same torch program
  (``StepDecoder``): greedy tokens equal, or the first position where they differ;
* **decode speed**: ExecuTorch decode tokens/s of every ``.pte``, rounds interleaved over
  ``--reps`` (median), against the ideal ratio of weight bytes read per token (every
  Linear weight, the LM head too, and the norms: at batch 1 decoding reads weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("IFP_QUIET", "1")

import torch  # noqa: E402

import ifp_compile as ifp  # noqa: E402
from benchmarks.decode import weight_bytes_per_token  # noqa: E402
from ifp_compile.decode_step import StepDecoder, export_decode_step  # noqa: E402
from ifp_compile.generate import chat_ids  # noqa: E402
from ifp_compile.predictors import PromptActivationPredictor  # noqa: E402
from ifp_compile.pte import PteDecoder, write_pte  # noqa: E402
from ifp_compile.real_model import load_smollm2  # noqa: E402

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and a short test."


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keeps", default="0.5", help="comma-separated keep ratios (default 0.5)")
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens per round (default 64)")
    p.add_argument("--reps", type=int, default=5, help="interleaved decode-speed rounds (default 5)")
    args = p.parse_args(argv)
    keeps = [float(k) for k in args.keeps.split(",")]
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = chat_ids(tok, PROMPT)
    cache = ids.shape[1] + args.tokens
    log("exporting the logits program (for the predictor) and the decode step")
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    step = export_decode_step(model, cache)
    blocks = ifp.find_ffn_blocks(step)
    dense_bytes = weight_bytes_per_token(model)
    programs = {"dense": (step, dense_bytes)}
    for keep in keeps:
        with torch.no_grad():
            masks = PromptActivationPredictor(ep, keep=keep)(tok(PROMPT, return_tensors="pt")["input_ids"])
        removed = sum((b.width - int(torch.count_nonzero(m))) * b.params_per_channel() * 4 for b, m in zip(blocks, masks))
        programs[f"keep {keep}"] = (ifp.specialize(step, mask=masks), dense_bytes - removed)
    work = Path(tempfile.mkdtemp(prefix="ifp-pte-"))
    rows = {}
    for name, (program, nbytes) in programs.items():
        log(f"lowering {name}")
        t0 = time.perf_counter()
        write_pte(program, work / f"{name}.pte")
        lower_s = time.perf_counter() - t0
        decoder = PteDecoder(work / f"{name}.pte", max_cache_len=cache)
        got, _ = decoder.greedy(ids, args.tokens)
        want, torch_speed = StepDecoder(program).greedy(ids, args.tokens)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        rows[name] = {"decoder": decoder, "bytes": nbytes, "lower_s": lower_s, "first_diff": first,
                      "size": (work / f"{name}.pte").stat().st_size, "params": ifp.count_parameters(program),
                      "torch_tps": torch_speed, "tps": []}
    for r in range(args.reps):
        log(f"decode round {r + 1}/{args.reps}")
        for row in rows.values():
            row["tps"].append(row["decoder"].greedy(ids, args.tokens)[1])
    dense = rows["dense"]
    dense_rate = statistics.median(dense["tps"])
    from executorch.version import __version__ as et_version

    print(f"\nSmolLM2-135M-Instruct decode steps in ExecuTorch {et_version} (XNNPACK, "
          f"float32), {args.tokens} greedy tokens after a {ids.shape[1]}-token prompt, median of {args.reps} interleaved "
          f"rounds, torch {torch.__version__}")
    print(f"  {'program':<10} {'parameters':>12} {'.pte MB':>8} {'lower s':>8} {'tokens = torch':>15} "
          f"{'tok/s':>7} {'speed-up':>9} {'ideal':>7} {'of ideal':>9}")
    for name, row in rows.items():
        rate = statistics.median(row["tps"])
        ideal = dense["bytes"] / row["bytes"]
        same = "yes" if row["first_diff"] is None else f"to pos {row['first_diff']}"
        print(f"  {name:<10} {row['params']:>12,} {row['size'] / 1e6:>8.1f} {row['lower_s']:>8.1f} {same:>15} "
              f"{rate:>7.1f} {rate / dense_rate:>8.2f}x {ideal:>6.2f}x {rate / dense_rate / ideal:>9.2f}")
    print("  (torch StepDecoder, uncompiled, for reference: "
          + ", ".join(f"{n} {r['torch_tps']:.1f} tok/s" for n, r in rows.items()) + ")")
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
