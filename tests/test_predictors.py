"""The training-free prompt-activation predictor (GRIFFIN's rule) and the instruction path."""

from __future__ import annotations

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.predictors import PromptActivationPredictor, keep_counts
from tests.helpers import export_lm
from tests.zoo import hf_model


def griffin_reference(lm, ids, k):
    """Independent eager implementation: hooks on every down projection's input."""
    acts = []
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, a, o: acts.append(a[0])) for layer in lm.model.layers]
    with torch.no_grad():
        lm(ids, use_cache=False)
    for h in hooks:
        h.remove()
    masks = []
    for h in acts:
        h = h[0]
        z = h / h.norm(dim=-1, keepdim=True)
        score = z.norm(dim=0)
        m = torch.zeros_like(score)
        m[score.topk(k).indices] = 1.0
        masks.append(m)
    return masks


class ToyTokenizer:
    """Maps characters to ids, like a tokenizer's __call__ with return_tensors='pt'."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}


@pytest.fixture(scope="module")
def llama():
    return hf_model("llama", inter=48, layers=3)


def test_masks_follow_griffins_rule(llama):
    pred = PromptActivationPredictor(llama, keep=0.25)
    ids = torch.tensor([[3, 77, 12, 5, 90, 41]])
    with torch.no_grad():
        got = pred(ids)
    want = griffin_reference(llama, ids, k=12)
    assert [int(m.sum()) for m in got] == [12, 12, 12]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_a_decode_step_program_predicts_the_logits_programs_masks(llama):
    """The instruction read as a prefill of a decode-step program gives the same scores
    and masks as the logits program, leaves the program's own cache untouched, and is
    refused when it is longer than the cache or batched."""
    from ifp_compile.decode_step import export_decode_step

    step = export_decode_step(llama, 16)
    by_step = PromptActivationPredictor(step, keep=0.25)
    by_logits = PromptActivationPredictor(llama, keep=0.25)
    cache = {k: v.clone() for k, v in step.constants.items()}
    for ids in (torch.tensor([[3, 77, 12, 5, 90, 41]]), torch.tensor([[9, 8]]), torch.arange(16)[None] + 20):
        with torch.no_grad():
            for a, b in zip(by_step.channel_scores(ids), by_logits.channel_scores(ids)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert all(torch.equal(a, b) for a, b in zip(by_step(ids), griffin_reference(llama, ids, k=12)))
    assert all(torch.equal(v, cache[k]) for k, v in step.constants.items())  # the probe wrote its own copy
    with pytest.raises(ifp.InstructionError, match="17 tokens; the decode-step program's KV cache holds 16"):
        by_step(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ifp.InstructionError, match=r"one instruction at a time.*\[2, 4\]"):
        by_step(torch.zeros(2, 4, dtype=torch.long))


def test_instruction_text_specializes_like_the_predicted_masks(llama):
    ep, ids = export_lm(llama)
    pred = PromptActivationPredictor(llama, keep=0.5)
    prog = ifp.insert_masks(ep, predictor=pred)
    tok = ToyTokenizer()
    small = ifp.specialize(prog, "Solve this math word problem.", tokenizer=tok)
    masks = pred(tok("Solve this math word problem.")["input_ids"])
    with torch.no_grad():
        ref = ifp.insert_masks(ep).module()(ids, masks)
        torch.testing.assert_close(small.module()(ids), ref, rtol=1e-5, atol=2e-5)
    dense = ifp.count_parameters(ep)
    # 24 of 48 channels kept in 3 blocks; each channel = gate row + up row + down column = 3 * 32
    assert ifp.count_parameters(small) == dense - 3 * 24 * 96
    # different instructions give different programs
    other = ifp.specialize(prog, "def reverse(s): return s[::-1]", tokenizer=tok)
    key = "lm.model.layers.2.mlp.up_proj.weight"
    assert not torch.equal(small.state_dict[key], other.state_dict[key])


def test_instruction_errors(llama):
    ep, _ = export_lm(llama)
    prog = ifp.insert_masks(ep, predictor=PromptActivationPredictor(llama, keep=0.5))
    with pytest.raises(ifp.InstructionError, match="instruction is empty"):
        ifp.specialize(prog, "   ", tokenizer=ToyTokenizer())
    with pytest.raises(ifp.InstructionError, match="needs tokenizer="):
        ifp.specialize(prog, "Write a poem.")
    with pytest.raises(ifp.InstructionError, match="instruction ids are empty"):
        ifp.specialize(prog, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ifp.InstructionError, match="integer tensor of shape"):
        ifp.specialize(prog, torch.zeros(1, 4))


def test_static_program_is_refused_by_the_predictor(llama):
    ep, _ = export_lm(llama, dynamic=False)
    with pytest.raises(ifp.ProgramError, match="static sequence length"):
        PromptActivationPredictor(ep, keep=0.5)


def test_keep_counts():
    assert keep_counts([10, 20], 0.5) == [5, 10]
    assert keep_counts([10, 20], 1.0) == [10, 20]
    assert keep_counts([10, 3], 0.01) == [1, 1]
    assert keep_counts([10, 20], [0, 7]) == [0, 7]
    with pytest.raises(ifp.IFPError, match=r"keep must be a ratio in \(0, 1\], got 1.5"):
        keep_counts([10], 1.5)
    with pytest.raises(ifp.IFPError, match="keep must be a ratio"):
        keep_counts([10], 0)
    with pytest.raises(ifp.IFPError, match="keep has 1 counts but the model has 2 FFN blocks"):
        keep_counts([10, 20], [3])
    with pytest.raises(ifp.IFPError, match=r"FFN block 1 must be an int in \[0, 20\]"):
        keep_counts([10, 20], [3, 21])
