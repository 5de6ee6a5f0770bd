"""Proof that training learns the right thing: on a model whose FFN channels are
task-specific by construction (tests/train/planted.py), the trained predictor's masks
recover each domain's planted channels, and its specialised loss is the dense loss
while a random mask of the same size is far worse."""

from __future__ import annotations

import json
import random

import torch

import ifp_compile as ifp
from ifp_compile.train import config_from_dict, evaluate, load_examples, run, setup
from tests.train.planted import HALF, PLANTED, V, planted_model, texts


def _write(path, rows):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))


def test_predictor_recovers_planted_channels(tmp_path):
    planted_model().save_pretrained(tmp_path / "model")
    rows = texts("A", 40, 32, seed=1) + texts("B", 40, 32, seed=2)
    random.Random(0).shuffle(rows)
    _write(tmp_path / "train.jsonl", rows)
    cfg = config_from_dict({
        "model": str(tmp_path / "model"), "tokenizer": "bytes", "data": str(tmp_path / "train.jsonl"),
        "out": str(tmp_path / "out"), "stage": 1, "keep": 0.5, "chunk_tokens": 8, "max_tokens": 32,
        "batch_size": 4, "steps": 100, "lr": 1e-2, "seed": 0, "predictor": {"encoder_layers": 1}})
    s = setup(cfg)
    run(cfg, setup_=s)
    g = torch.Generator().manual_seed(0)
    report = {}
    for domain, seed in (("A", 10), ("B", 11)):  # held-out sequences
        _write(tmp_path / f"{domain}.jsonl", texts(domain, 10, 32, seed=seed))
        examples = load_examples(tmp_path / f"{domain}.jsonl", 1, s.tokenizer, 8, 32)
        with torch.no_grad():
            masks = {ex: s.predictor(torch.tensor([ex.predictor_ids])) for ex in examples}
        kept = [set(m[0].nonzero().flatten().tolist()) for m in masks.values()]
        overlap = sum(len(k & PLANTED[domain]) for k in kept) / (HALF * len(kept))

        def random_mask(ex):
            m = torch.zeros(V)
            m[torch.randperm(V, generator=g)[:HALF]] = 1.0
            return [m]

        dense = evaluate(s.loss.lm, examples, lambda ex: [torch.ones(V)])
        predicted = evaluate(s.loss.lm, examples, lambda ex: masks[ex])
        rand = evaluate(s.loss.lm, examples, random_mask)
        report[domain] = dict(overlap=overlap, dense=dense, predicted=predicted, random=rand)
    print(report)  # shown with pytest -s
    for domain, r in report.items():
        assert r["overlap"] == 1.0, f"domain {domain}: predicted masks overlap the planted channels {r['overlap']:.0%}"
        assert r["predicted"] < r["dense"] + 0.05, (domain, r)
        assert r["random"] > 0.5 and r["random"] > 20 * r["predicted"], (domain, r)
    # and the specialised model for one instruction is the dense model's half, same loss
    program = ifp.insert_masks(s.program, predictor=s.predictor)
    instr = torch.tensor([s.tokenizer.encode(texts("A", 1, 8, seed=99)[0])])
    small = ifp.specialize(program, instr)
    assert ifp.count_parameters(small) == ifp.count_parameters(s.program) - HALF * 3 * 2 * V
