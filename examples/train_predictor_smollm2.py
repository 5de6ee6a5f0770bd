"""Train an IFPredictor for SmolLM2-135M-Instruct on CPU and compare masks at keep 0.5.

    python examples/train_predictor_smollm2.py [--steps 450] [--work DIR] [--keep 0.5]

Data that exists on every machine (ifp_compile/corpora.py): Python standard-library
source (code), docstrings of installed packages (prose) and generated arithmetic word
problems (math); held-out files/problems for evaluation. The LLM is frozen; the
predictor's encoder is the model's own first 4 layers (shared weights), so only the MLP
head (576 -> 128 -> 30 x 1536) trains, starting from the static mask (see below).

Training is stage 1 of the paper: texts cut into 64-token chunks, the mask predicted
from chunk j applied while predicting chunk j + 1.

Evaluation, per domain, on held-out segments: the mask comes from the first 64 tokens,
the loss is over tokens 64-256. Rows:

- dense:                 no mask
- random:                keep a random half of every block
- static:                GRIFFIN's rule over mixed calibration text (the first 16
                         training examples, all domains): one mask for everything
- prompt activations:    GRIFFIN's rule on the segment's own first 64 tokens
- IFPredictor:           the trained predictor on the segment's first 64 tokens
- IFPredictor, per task: the trained predictor on one fixed instruction per domain

The "gap closed" column is (static - method) / (static - dense).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


from ifp_compile import corpora as domain_corpora  # noqa: E402

from ifp_compile.evaluation.tasks import loss_examples  # noqa: E402
from ifp_compile.predictors import PromptActivationPredictor  # noqa: E402
from ifp_compile.progress import status  # noqa: E402
from ifp_compile.train import config_from_dict, evaluate, load_examples, run, setup  # noqa: E402
from ifp_compile.train.data import encode  # noqa: E402
from ifp_compile.train.trainer import static_scores  # noqa: E402

PROMPT, TOTAL = 64, 256
TASK_INSTRUCTIONS = {
    "code": "Write a Python module: functions, classes and imports from the standard library.",
    "prose": "Write the documentation of a Python library in plain English prose.",
    "math": "Solve this arithmetic word problem step by step and give the answer.",
}


def topk_mask(scores: list[torch.Tensor], counts: list[int]) -> list[torch.Tensor]:
    return [torch.zeros_like(s).index_fill(0, torch.topk(s, k).indices, 1.0) for s, k in zip(scores, counts)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=450, help="training steps of 4 examples (default 450, ~25 min)")
    ap.add_argument("--train-texts", type=int, default=200, help="training texts per domain (default 200)")
    ap.add_argument("--eval-segments", type=int, default=12, help="held-out segments per domain (default 12)")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work", default=None, help="where data and checkpoints go (default: a temp dir)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="ifp-train-"))
    work.mkdir(parents=True, exist_ok=True)

    with status("collecting the code / prose / math corpora"):
        per_domain = {d: domain_corpora.texts(d, "train", args.train_texts, min_chars=1200) for d in domain_corpora.TEXT_DOMAINS}
        mixed = [per_domain[d][i] for i in range(args.train_texts) for d in domain_corpora.TEXT_DOMAINS]  # interleaved
        domain_corpora.write_jsonl(work / "train.jsonl", mixed)
    cfg = config_from_dict({
        "model": "default", "data": str(work / "train.jsonl"), "out": str(work / "run"), "stage": 1,
        "keep": args.keep, "train_llm": False, "chunk_tokens": PROMPT, "max_tokens": 3 * PROMPT,
        "batch_size": 4, "steps": args.steps, "lr": args.lr, "seed": 0, "save_every": 50,
        "predictor": {"encoder_layers": 4, "init": "static", "init_examples": 16}})
    s = setup(cfg)
    t0 = time.perf_counter()
    result = run(cfg, setup_=s)
    minutes = (time.perf_counter() - t0) / 60

    train = load_examples(cfg.data, 1, s.tokenizer, cfg.chunk_tokens, cfg.max_tokens)
    counts = s.predictor.counts
    static = topk_mask(static_scores(s.program, train[:16]), counts)
    probe = PromptActivationPredictor(s.program, keep=counts)
    widths = s.widths
    g = torch.Generator().manual_seed(0)

    def random_mask(ex):
        return [torch.zeros(w).index_fill(0, torch.randperm(w, generator=g)[:k], 1.0) for w, k in zip(widths, counts)]

    def predicted(ex):
        with torch.no_grad():
            return s.predictor(torch.tensor([ex.predictor_ids]))

    rows: dict[str, dict[str, float]] = {}
    lm = s.loss.lm
    for domain in domain_corpora.TEXT_DOMAINS:
        exs = loss_examples(s.tokenizer, domain, args.eval_segments, prompt=PROMPT, total=TOTAL)
        with torch.no_grad():
            task_mask = s.predictor(torch.tensor([encode(s.tokenizer, TASK_INSTRUCTIONS[domain])]))
        methods = {
            "dense": lambda ex: [torch.ones(w) for w in widths],
            "random": random_mask,
            "static (GRIFFIN, calibration text)": lambda ex: static,
            "prompt activations (first 64 tokens)": lambda ex: probe(torch.tensor([ex.predictor_ids])),
            "IFPredictor (first 64 tokens)": predicted,
            "IFPredictor, per task (one instruction)": lambda ex: task_mask,
        }
        with status(f"evaluating {domain}: {len(methods)} masks x {len(exs)} segments"):
            for name, fn in methods.items():
                rows.setdefault(name, {})[domain] = evaluate(lm, exs, fn)

    print()
    print(f"SmolLM2-135M-Instruct, keep {args.keep}, LLM frozen; predictor: encoder = first 4 layers, "
          f"head 576->128->{sum(widths)}; {result.steps} steps x 4 examples in {minutes:.1f} min "
          f"({result.tokens_per_second:.0f} tokens/s); training loss {result.losses[0]:.3f} -> "
          f"{sum(result.losses[-20:]) / min(20, len(result.losses)):.3f} (mean of the last 20)")
    print(f"held-out loss (mask from tokens 0-{PROMPT}, loss on tokens {PROMPT}-{TOTAL}; "
          f"{args.eval_segments} segments per domain)")
    doms = domain_corpora.TEXT_DOMAINS
    head = f"{'mask':<42}" + "".join(f"{d:>9}" for d in doms) + "   gap closed (" + " / ".join(doms) + ")"
    print(head)
    print("-" * len(head))
    st_, de = rows["static (GRIFFIN, calibration text)"], rows["dense"]
    for name, r in rows.items():
        gap = " / ".join(f"{(st_[d] - r[d]) / (st_[d] - de[d]):+.0%}" for d in doms)
        print(f"{name:<42}" + "".join(f"{r[d]:>9.3f}" for d in doms) + f"   {gap}")
    beats = all(rows["IFPredictor (first 64 tokens)"][d] < st_[d] for d in doms)
    print(f"\ntrained IFPredictor beats the static mask in every domain: {'yes' if beats else 'NO'}")
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"(checkpoint: {result.checkpoint}; table: {work / 'results.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
