"""Greedy decoding with an exported program matches Hugging Face's own greedy decoding."""

from __future__ import annotations

import torch

import ifp_compile as ifp
from ifp_compile.generate import greedy_generate
from tests.zoo import hf_model


def test_greedy_generate_matches_hf_generate():
    model = hf_model("llama")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    ep = ifp.export(model, (ids,), dynamic_shapes="seq")
    ours = greedy_generate(ep.module(), ids, max_new_tokens=8)
    with torch.no_grad():
        theirs = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs[0, ids.shape[1]:].tolist()


def test_greedy_generate_stops_at_eos():
    model = hf_model("llama")
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(1))
    ep = ifp.export(model, (ids,), dynamic_shapes="seq")
    full = greedy_generate(ep.module(), ids, max_new_tokens=6)
    eos = int(full[3])
    first = full.tolist().index(eos)
    assert greedy_generate(ep.module(), ids, max_new_tokens=6, eos_token_id=eos).tolist() == full[:first].tolist()
