"""Decode-step programs (static KV cache inside): same logits as the model, and the FFN
passes apply to them exactly as to a prefix program."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ifp_compile as ifp
from ifp_compile.decode_step import StepDecoder, export_decode_step, max_cache_len
from tests.helpers import breadth, export_lm, make_mask
from tests.zoo import hf_model

CACHE = 16


@pytest.fixture(scope="module")
def llama():
    model = hf_model("llama", layers=3)
    step = export_decode_step(model, CACHE)
    return model, step, ifp.insert_masks(step)


def _chunks(module, ids, extra=()):
    """Logits of the prompt in one call, then one token per call, stacked along positions."""
    out = [module(ids[:, :4], torch.arange(4), *extra)]
    for i in range(4, ids.shape[1]):
        out.append(module(ids[:, i:i + 1], torch.tensor([i]), *extra))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_step_program_logits_equal_the_model(family):
    model = hf_model(family)
    step = export_decode_step(model, CACHE)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_chunks(step.module(), ids), model(ids).logits, rtol=1e-5, atol=1e-5)
    assert model.generation_config.cache_implementation is None  # restored after export
    assert max_cache_len(step) == CACHE


@settings(max_examples=6)
@given(kinds=st.lists(st.sampled_from(["binary", "soft", "one", "none", "all"]), min_size=3, max_size=3),
       seed=st.integers(0, 2**16))
def test_specialised_step_program_equals_masked_step_program(llama, kinds, seed):
    model, step, masked = llama
    blocks = ifp.find_ffn_blocks(step)
    assert [b.width for b in blocks] == [b.width for b in ifp.find_ffn_blocks(export_lm(model)[0])]
    g = torch.Generator().manual_seed(seed)
    masks = [make_mask(b.width, k, g) for b, k in zip(blocks, kinds)]
    small = ifp.specialize(step, mask=masks)
    ids = torch.randint(0, 100, (1, 8), generator=g)
    with torch.no_grad():
        ref = _chunks(masked.module(), ids, (masks,))
        torch.testing.assert_close(_chunks(small.module(), ids), ref, rtol=1e-5, atol=1e-5)
    d, w = model.config.hidden_size, sum(b.width for b in blocks)
    removed = sum(int((m == 0).sum()) for m in masks) * 3 * d  # gate rows, up rows, down columns
    assert ifp.count_parameters(small) == ifp.count_parameters(step) - removed
    assert w == 3 * model.config.intermediate_size


def test_greedy_decoding_matches_generate_for_both_step_shapes(llama):
    model, step, _ = llama
    ids = torch.randint(0, 100, (1, 5), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0, 5:].tolist()
    assert StepDecoder(step).greedy(ids, 8)[0] == expected
    one = export_decode_step(model, CACHE, prompt_chunks=False)
    assert StepDecoder(one).greedy(ids, 8)[0] == expected
    # a second generation from the same program overwrites the cache: same tokens again
    decoder = StepDecoder(step)
    assert decoder.greedy(ids, 8)[0] == decoder.greedy(ids, 8)[0] == expected
    # the benchmark's runtime: decode steps through torch.compile, the prompt uncompiled
    assert StepDecoder(step, run=lambda m: torch.compile(m, dynamic=False)).greedy(ids, 8)[0] == expected


def test_bad_input_is_refused_with_a_message(llama):
    model, step, _ = llama
    with pytest.raises(ifp.ProgramError, match="transformers causal LM.*HandMLP"):
        from tests.zoo import HandMLP

        export_decode_step(HandMLP(), CACHE)
    with pytest.raises(ifp.ProgramError, match="max_cache_len must be an integer >= 2, got 1"):
        export_decode_step(model, 1)
    with pytest.raises(ifp.InstructionError, match="12 prompt \\+ 6 new tokens need 17 cache positions; .* holds 16"):
        StepDecoder(step).greedy(torch.zeros(1, 12, dtype=torch.long), 6)
    with pytest.raises(ifp.InstructionError, match="prompt_ids must be \\[1, T\\]"):
        StepDecoder(step).greedy(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ifp.InstructionError, match="new_tokens must be an integer >= 1, got 0"):
        StepDecoder(step).greedy(torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ifp.ProgramError, match="not a decode-step program"):
        max_cache_len(export_lm(model)[0])


def test_decoders_of_programs_sharing_an_export_do_not_share_a_cache(llama):
    model, step, _ = llama
    g = torch.Generator().manual_seed(2)
    a_ids, b_ids = torch.randint(0, 100, (1, 6), generator=g), torch.randint(0, 100, (1, 4), generator=g)
    small = ifp.specialize(step, mask=[torch.ones(b.width) for b in ifp.find_ffn_blocks(step)])
    a, b = StepDecoder(step), StepDecoder(small)
    with torch.no_grad():
        a._call(a.module, a_ids, 0)
        b._call(b.module, b_ids, 0)  # would overwrite a's cache positions 0-3 if shared
        nxt = torch.tensor([[7]])
        got = a._call(a.module, nxt, 6)[0, -1]
        want = model(torch.cat([a_ids, nxt], 1)).logits[0, -1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", breadth([torch.bfloat16], [torch.float16]))
def test_decode_step_programs_in_half_precision(dtype):
    import copy

    from tests.helpers import assert_within_rounding

    model = hf_model("llama", layers=2).to(dtype)
    step = export_decode_step(model, CACHE)
    exact = ifp.insert_masks(export_decode_step(copy.deepcopy(model).float(), CACHE))
    blocks = ifp.find_ffn_blocks(step)
    g = torch.Generator().manual_seed(5)
    masks = [make_mask(b.width, k, g) for b, k in zip(blocks, ["soft", "binary"])]
    masked, small = ifp.insert_masks(step), ifp.specialize(step, mask=masks)
    ids = torch.randint(0, 100, (1, 8), generator=g)
    with torch.no_grad():
        ref = _chunks(masked.module(), ids, (masks,))
        out = _chunks(small.module(), ids)
        assert out.dtype == dtype
        assert_within_rounding(out, ref, _chunks(exact.module(), ids, (masks,)), dtype)
    tokens, _ = StepDecoder(small).greedy(ids[:, :4], 5)
    assert len(tokens) == 5 and all(0 <= t < 128 for t in tokens)
