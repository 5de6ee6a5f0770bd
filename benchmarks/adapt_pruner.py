"""Adapt-Pruner on SmolLM2-135M-Instruct: held-out loss at equal parameter count, side by side.

    python benchmarks/adapt_pruner.py [--train-steps 12] [--steps 5] [--eval-chunks 12]

Two settings, every row with exactly the same number of parameters within a setting:

A. 50% of FFN channels removed;
B. 50% of FFN channels and 25% of key/value heads (each with its query group) removed.

Rows: dense; uniform (the same fraction in every layer) with magnitude, first-order Taylor
and activation scores (the last is a static mask from calibration activations: GRIFFIN's
rule over mixed text); adaptive (this project) with each of the three, no training;
adaptive with the incremental schedule (``--steps`` pruning steps with ``--train-steps``
trainer steps after each) for ``--train-methods``;
and the peer Torch-Pruning 1.6.1 (its magnitude pruner, FFN only: it cannot remove
key/value heads of a GQA model). Held-out text: standard-library Python files and
package docstrings that calibration and training never see (ifp_compile/corpora.py
splits by file). Calibration and training text: the training split of both domains.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ifp_compile import corpora as domain_corpora  # noqa: E402

import ifp_compile as ifp  # noqa: E402
from benchmarks.peers import torch_pruning_peer as peer  # noqa: E402
from ifp_compile.adapt import METHODS, adapt_prune, structure_scores, uniform_masks  # noqa: E402
from ifp_compile.adapt.incremental import trainer_hook  # noqa: E402
from ifp_compile.real_model import load_smollm2  # noqa: E402


def chunks(tok, texts, n, length):
    ids = []
    for t in texts:
        ids += tok(t)["input_ids"]
    return [torch.tensor([ids[i * length:(i + 1) * length]]) for i in range(min(n, len(ids) // length))]


@torch.no_grad()
def loss_of(module, evals, extra=()):
    total = 0.0
    for c in evals:
        logits = module(c, *extra)
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), c[0, 1:]))
    return total / len(evals)


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="pruning steps (default 5)")
    p.add_argument("--train-steps", type=int, default=12, help="trainer steps after each pruning step (default 12)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of that training (default 5e-5)")
    p.add_argument("--eval-chunks", type=int, default=12, help="held-out chunks of 256 tokens per domain (default 12)")
    p.add_argument("--calib-chunks", type=int, default=4, help="calibration chunks per domain (default 4)")
    p.add_argument("--train-methods", default="taylor,activation",
                   help="within-layer scores of the incremental-schedule rows, comma-separated (default taylor,activation)")
    p.add_argument("--json", help="also write the table as JSON here")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    model, tok = load_smollm2()
    L = 256
    calib = (chunks(tok, domain_corpora.texts("code", "train", 8), args.calib_chunks, L)
             + chunks(tok, domain_corpora.texts("prose", "train", 8), args.calib_chunks, L))
    evals = {d: chunks(tok, domain_corpora.texts(d, "heldout", 3 * args.eval_chunks), args.eval_chunks, L)
             for d in ("code", "prose")}
    train_texts = domain_corpora.texts("code", "train", 40, seed=1) + domain_corpora.texts("prose", "train", 40, seed=1)
    scratch = Path(tempfile.mkdtemp(prefix="ifp-bench-adapt-"))
    train_file = scratch / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts))
    log(f"calibration {len(calib)} x {L} tokens, held-out {len(evals['code'])}+{len(evals['prose'])} x {L}, "
        f"training {len(train_texts)} texts")

    ep = ifp.export(model, (calib[0],), dynamic_shapes="seq")
    masked = ifp.insert_masks(ep, heads=True)
    run = masked.module()
    blocks, attention = ifp.find_ffn_blocks(ep), ifp.find_attention_blocks(ep)
    ones_f = [torch.ones(b.width) for b in blocks]
    ones_h = [torch.ones(a.width) for a in attention]
    dense_params = ifp.count_parameters(ep)

    def evaluate(ffn, heads):
        return {d: loss_of(run, evals[d], (ffn, heads)) for d in evals}

    def params(ffn, heads):
        return ifp.kept_parameters(ep, blocks + attention, list(ffn) + list(heads))

    rows = {"A": [], "B": []}

    def add(setting, name, ffn, heads, losses=None, n_params=None, seconds=None):
        losses = losses or evaluate(ffn, heads)
        n = n_params if n_params is not None else params(ffn, heads)
        rows[setting].append({"method": name, "code": losses["code"], "prose": losses["prose"], "params": n,
                              "seconds": seconds})
        log(f"{setting} {name}: code {losses['code']:.3f} prose {losses['prose']:.3f} params {n:,}")

    add("A", "dense", ones_f, ones_h)
    with torch.no_grad():
        scores = {"magnitude": (structure_scores(ep, blocks, "magnitude"), structure_scores(ep, attention, "magnitude"))}
    scores["Taylor"] = (structure_scores(ep, blocks, "taylor", calib), structure_scores(ep, attention, "taylor", calib))
    scores["activation"] = (structure_scores(ep, blocks, "activation", calib),
                            structure_scores(ep, attention, "activation", calib))
    names = {"magnitude": "uniform magnitude", "Taylor": "uniform Taylor",
             "activation": "uniform activation = static mask (GRIFFIN's rule)"}
    for setting, h_target in (("A", 0.0), ("B", 0.25)):
        for name, (sf, sh) in scores.items():
            heads = uniform_masks(sh, h_target) if h_target else ones_h
            add(setting, names[name], uniform_masks(sf, 0.5), heads)

    results = {}
    for setting, h_target in (("A", 0.0), ("B", 0.25)):
        for method in METHODS:
            t0 = time.perf_counter()
            r = adapt_prune(ep, calib, 0.5, heads_target=h_target, steps=args.steps, method=method, progress=log)
            heads = r.head_masks if r.head_masks is not None else ones_h
            add(setting, f"adaptive {method} (this project)", r.ffn_masks, heads, seconds=time.perf_counter() - t0)
            results[(setting, method)] = r

    t0 = time.perf_counter()
    tp_model = peer.prune_ffn_channels(copy.deepcopy(model), calib[0], 0.5)
    tp_losses = {d: peer.held_out_loss(tp_model, evals[d]) for d in evals}
    add("A", "Torch-Pruning 1.6.1 magnitude (peer)", None, None, tp_losses,
        sum(p.numel() for p in tp_model.parameters()), time.perf_counter() - t0)
    del tp_model

    for (setting, h_target), method in itertools.product((("A", 0.0), ("B", 0.25)), args.train_methods.split(",")):
        t0 = time.perf_counter()
        work = copy.deepcopy(model)
        work_ep = ifp.export(work, (calib[0],), dynamic_shapes="seq")
        work_masked = ifp.insert_masks(work_ep, heads=True)
        hook = trainer_hook(work, tok, work_ep, work_masked, train_file, steps=args.train_steps, lr=args.lr,
                            chunk_tokens=128, max_tokens=256, heads=True)
        r = adapt_prune(work_ep, calib, 0.5, heads_target=h_target, steps=args.steps, method=method,
                        progress=log, train=lambda step, f, h: hook(step, f, h if h is not None else ones_h))
        heads = r.head_masks if r.head_masks is not None else ones_h
        small = ifp.specialize(work_ep, mask=r.ffn_masks, head_mask=heads)
        losses = {d: loss_of(small.module(), evals[d]) for d in evals}
        add(setting, f"adaptive {method} + training ({args.steps}x{args.train_steps} steps)", r.ffn_masks,
            heads, losses, ifp.count_parameters(small), time.perf_counter() - t0)
        results[(setting, f"{method} trained")] = r
        del work, work_ep, work_masked, small

    print(f"\nSmolLM2-135M-Instruct, dense {dense_params:,} parameters; held-out next-token loss "
          f"({len(evals['code'])} x {L} tokens per domain; lower is better)")
    for setting, title in (("A", "A. 50% of FFN channels removed"),
                           ("B", "B. 50% of FFN channels and 25% of key/value heads removed")):
        print(f"\n{title}")
        print(f"{'method':<58} {'code':>7} {'prose':>7} {'parameters':>13}")
        for row in rows[setting]:
            print(f"{row['method']:<58} {row['code']:>7.3f} {row['prose']:>7.3f} {row['params']:>13,}")
        if setting == "B":
            print(f"{'Torch-Pruning 1.6.1 (peer)':<58} {'n/a: cannot remove key/value heads of a GQA model':>29}")
    for key in results:
        r = results[key]
        print(f"\nadaptive {key[1]}, setting {key[0]}: FFN widths per layer {[int(m.sum()) for m in r.ffn_masks]}")
        if r.head_masks is not None:
            print(f"  kv heads per layer {[int(m.sum()) for m in r.head_masks]}")
        print(f"  final layer importance {[round(x, 2) for x in r.importance[-1]]}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
