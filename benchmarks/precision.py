"""How far the specialized program is from the masked reference in bf16 and fp16.

    python benchmarks/precision.py [--models 40] [--smollm2]

For random tiny decoder LMs (1-4 layers, gated or not, five activations, biases, GQA) and
random masks (all, none, one, binary, soft per block), in bfloat16 and float16, it prints
the distribution of

* ``|spec - ref| / (u * max|exact|)``: the difference in units of the dtype's rounding of
  the output's scale (``u`` = 2^-8 for bf16, 2^-11 for fp16);
* ``|spec - ref| / max(|ref - exact|, u * max|exact|)``: the difference relative to the
  reference's own rounding error, the quantity the tests bound by 3
  (``tests.helpers.assert_within_rounding``, derived in docs/architecture.md "Precision");

where ``ref`` is the masked program and ``spec`` the specialized one, both in the dtype, and
``exact`` the masked program in float32 on the same (rounded) weights. ``--smollm2`` adds
the same figures for SmolLM2-135M-Instruct in bf16 at keep 0.5 (binary and soft masks).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("IFP_QUIET", "1")

import ifp_compile as ifp  # noqa: E402
from tests.helpers import UNIT_ROUNDOFF, make_mask  # noqa: E402
from tests.helpers import cast_model as cast  # noqa: E402
from tests.zoo import TinyLM  # noqa: E402


def measure(model32, dtype, ids, masks_for):
    lm = cast(model32, dtype)
    ep = ifp.export(lm, (ids,))
    exact_ep = ifp.export(cast(lm, torch.float32), (ids,))
    masks = masks_for(ifp.find_ffn_blocks(ep))
    masked = ifp.insert_masks(ep)
    with torch.no_grad():
        ref = masked.module()(ids, masks).float()
        spec = ifp.specialize(masked, mask=masks).module()(ids).float()
        exact = ifp.insert_masks(exact_ep).module()(ids, masks).float()
    u = UNIT_ROUNDOFF[dtype]
    scale = exact.abs().max().item()
    diff = (spec - ref).abs().max().item()
    ref_err = (ref - exact).abs().max().item()
    return diff / (u * scale), diff / max(ref_err, u * scale)


def tiny_models(n: int):
    for trial in range(n):
        rnd = random.Random(trial)
        layers = rnd.randint(1, 4)
        kv = rnd.choice([1, 2])
        heads = kv * rnd.choice([1, 2])
        kw = dict(d=heads * rnd.choice([2, 4]), widths=tuple(rnd.randint(1, 24) for _ in range(layers)),
                  gated=rnd.random() < 0.5, act=rnd.choice(["relu", "silu", "gelu", "gelu_tanh", "gelu_new"]),
                  bias=rnd.random() < 0.5, n_heads=heads, n_kv=kv)
        torch.manual_seed(trial)
        g = torch.Generator().manual_seed(trial)
        ids = torch.randint(0, 128, (2, 7), generator=g)
        kinds = [rnd.choice(["all", "none", "one", "binary", "soft"]) for _ in range(layers)]
        yield TinyLM(**kw).eval(), ids, (lambda blocks, g=g, kinds=kinds: [make_mask(b.width, k, g) for b, k in zip(blocks, kinds)])


def summary(name: str, values: list[float]) -> str:
    return f"{name}: median {statistics.median(values):.2f}, max {max(values):.2f} (n={len(values)})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", type=int, default=40, help="random tiny models per dtype (default 40)")
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M-Instruct in bf16 (needs the real model)")
    args = p.parse_args(argv)
    for dtype in (torch.bfloat16, torch.float16):
        rows = [measure(m, dtype, ids, masks_for) for m, ids, masks_for in tiny_models(args.models)]
        print(f"{str(dtype)[6:]} over {args.models} random tiny LMs x masks:")
        print("  " + summary("|spec - ref| / (u max|exact|)", [a for a, _ in rows]))
        print("  " + summary("|spec - ref| / max(reference's own error, u max|exact|)  [tests bound this by 3]",
                             [b for _, b in rows]))
    if args.smollm2:
        from ifp_compile.real_model import load_smollm2

        model, tok = load_smollm2(dtype="float32")
        ids = tok("Write a Python function that reverses a string.", return_tensors="pt")["input_ids"]
        for kind in ("binary", "soft"):
            g = torch.Generator().manual_seed(0)

            def masks_for(blocks, kind=kind, g=g):
                out = []
                for b in blocks:
                    m = torch.zeros(b.width)
                    keep = torch.randperm(b.width, generator=g)[: b.width // 2]
                    m[keep] = 1.0 if kind == "binary" else torch.rand(keep.numel(), generator=g) + 0.5
                    out.append(m)
                return out

            a, b = measure(model, torch.bfloat16, ids, masks_for)
            print(f"SmolLM2 bf16, keep 0.5, {kind} masks: |spec - ref| = {a:.2f} u max|exact|, "
                  f"{b:.2f}x the reference's own error")


if __name__ == "__main__":
    main()
