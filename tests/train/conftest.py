"""Fixtures for training tests: a tiny saved Llama and JSONL data for both stages."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.zoo import _hf

WORDS = ("alpha beta gamma delta sum of two numbers is the answer code def return print loop "
         "list item value key map filter reduce yield class self init").split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    _hf("llama", layers=2).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    (d / "text.jsonl").write_text("".join(json.dumps({"text": random_text(rng, 40)}) + "\n" for _ in range(12)))
    lines = []
    for i in range(8):
        if i % 2:
            lines.append({"instruction": random_text(rng, 6), "response": random_text(rng, 10)})
        else:
            lines.append({"messages": [{"role": "system", "content": "be brief"},
                                       {"role": "user", "content": random_text(rng, 6)},
                                       {"role": "assistant", "content": random_text(rng, 8)},
                                       {"role": "user", "content": random_text(rng, 4)},
                                       {"role": "assistant", "content": random_text(rng, 5)}]})
    (d / "chat.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def make_config(tiny_model_dir: Path, data: Path, out: Path, **overrides) -> dict:
    cfg = {"model": str(tiny_model_dir), "tokenizer": "bytes", "data": str(data), "out": str(out),
           "stage": 1, "keep": 0.5, "chunk_tokens": 16, "max_tokens": 64, "batch_size": 4, "steps": 4,
           "lr": 1e-2, "seed": 0, "predictor": {"encoder_layers": 1}}
    predictor = overrides.pop("predictor", {})
    cfg.update(overrides)
    cfg["predictor"].update(predictor)
    return cfg
