"""IFPredictor: soft top-k masks from an encoder LM, as a branch of the masked program."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ifp_compile as ifp
from ifp_compile.errors import IFPError, InstructionError
from ifp_compile.predictors import IFPredictor, LMEncoder
from tests.helpers import examples
from tests.zoo import VOCAB, _hf


def _setup(family: str, layers: int = 2):
    torch.manual_seed(0)
    model = _hf(family, layers=layers)
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    return model, ep, [b.width for b in ifp.find_ffn_blocks(ep)]


def test_masks_have_k_soft_entries_per_block():
    model, _, widths = _setup("llama")
    pred = IFPredictor(LMEncoder(model, num_layers=1), widths, keep=[16, 40])
    ids = torch.randint(0, VOCAB, (1, 6))
    masks = pred(ids)
    assert [int((m != 0).sum()) for m in masks] == [16, 40]
    assert all(m.shape == (w,) for m, w in zip(masks, widths))
    # a batch of right-padded instructions: each row equals its unpadded prediction
    short = ids[:, :4]
    padded = torch.cat([ids, torch.cat([short, torch.zeros(1, 2, dtype=torch.long)], 1)])
    attn = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    batch = pred.batch_masks(padded, attn)
    for b, (m_full, m_short) in enumerate(zip(pred(ids), pred(short))):
        torch.testing.assert_close(batch[b][0], m_full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch[b][1], m_short, atol=1e-5, rtol=1e-5)


@settings(max_examples=examples(5))
@given(family=st.sampled_from(["llama", "qwen2", "gemma", "phi3", "gpt2"]), keep=st.sampled_from([0.25, 0.5, 0.9]),
       seed=st.integers(0, 1000), n_layers=st.integers(1, 2))
def test_specialize_with_ifpredictor_equals_masked_program(family, keep, seed, n_layers):
    model, ep, widths = _setup(family)
    torch.manual_seed(seed)
    pred = IFPredictor(LMEncoder(model, num_layers=n_layers), widths, keep=keep)
    with torch.no_grad():  # a non-trivial head, so masks depend on the instruction
        for p in pred.head.parameters():
            p.normal_(0, 0.5)
    program = ifp.insert_masks(ep, predictor=pred)
    g = torch.Generator().manual_seed(seed)
    instr = torch.randint(0, VOCAB, (1, 5), generator=g)
    x = torch.randint(0, VOCAB, (1, 9), generator=g)
    small = ifp.specialize(program, instr)
    with torch.no_grad():
        masks = pred(instr)
        ref = ifp.insert_masks(ep).module()(x, masks)
        torch.testing.assert_close(program.module()(x, instr), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(small.module()(x), ref, rtol=1e-4, atol=1e-5)
    counts = [int((m != 0).sum()) for m in masks]
    assert ifp.count_parameters(small) == ifp.count_parameters(ep) - sum(
        b.params_per_channel() * (b.width - k) for b, k in zip(ifp.find_ffn_blocks(ep), counts))
    # the encoder shares the target's weights: the program adds only the MLP head
    head = sum(p.numel() for p in pred.head.parameters())
    assert ifp.count_parameters(program) == ifp.count_parameters(ep) + head


def test_separate_encoder_model():
    model, ep, widths = _setup("llama")
    encoder_lm = _hf("qwen2", hidden=16, inter=32, layers=1)
    pred = IFPredictor(LMEncoder(encoder_lm), widths, keep=0.5)
    program = ifp.insert_masks(ep, predictor=pred)
    instr = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        ref = ifp.insert_masks(ep).module()(instr, pred(instr))
        torch.testing.assert_close(ifp.specialize(program, instr).module()(instr), ref, rtol=1e-4, atol=1e-5)


def test_init_from_scores_starts_at_that_mask():
    model, _, widths = _setup("llama")
    pred = IFPredictor(LMEncoder(model, num_layers=1), widths, keep=0.25)
    scores = [torch.randn(w) for w in widths]
    pred.init_from_scores(scores, scale=8.0)
    masks = pred(torch.randint(0, VOCAB, (1, 7)))
    for m, s in zip(masks, scores):
        assert set((m != 0).nonzero().flatten().tolist()) == set(torch.topk(s, 16).indices.tolist())


def test_bad_inputs_are_named():
    model, ep, widths = _setup("llama")
    with pytest.raises(IFPError, match="FFN block 1 must be an int in \\[0, 64\\], got 65"):
        IFPredictor(LMEncoder(model, num_layers=1), widths, keep=[8, 65])
    with pytest.raises(IFPError, match="keep count for FFN block 0 is 0"):
        IFPredictor(LMEncoder(model, num_layers=1), widths, keep=[0, 8])
    with pytest.raises(IFPError, match="num_layers must be in \\[1, 2\\], got 3"):
        LMEncoder(model, num_layers=3)
    pred = IFPredictor(LMEncoder(model, num_layers=1), widths, keep=0.5)
    bad = torch.tensor([[3, VOCAB + 5]])
    with pytest.raises(IFPError, match=f"token id {VOCAB + 5} is outside the predictor encoder's vocabulary"):
        pred(bad)
    program = ifp.insert_masks(ep, predictor=pred)
    with pytest.raises(InstructionError, match=f"token id {VOCAB + 5} is outside the predictor's vocabulary"):
        ifp.specialize(program, bad)
