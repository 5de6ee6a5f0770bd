"""Half precision: every pass works in bfloat16 and float16 as in float32.

The semantics (docs/architecture.md, "Precision"): the masked reference multiplies ``h`` by
the mask rounded to ``h``'s dtype; specialization folds a soft mask into ``W_down`` in
float32 and rounds once to the weight's dtype (``ifp_compile.slicing.take``). The
specialized program then equals the masked reference in the same dtype up to the bound
``tests.helpers.assert_within_rounding`` checks: no further from it than the reference is
from the exact (float32) value, times 3.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ifp_compile as ifp
from tests.helpers import (
    assert_within_rounding,
    breadth,
    examples,
    export_lm,
    make_mask,
    state_placeholder_shapes,
    tiny_lms,
)
from tests.zoo import HF_FAMILIES, VOCAB, hf_model

HALF = [torch.bfloat16, torch.float16]
MASK_KINDS = ["all", "none", "one", "binary", "soft"]


def check_half(lm32, dtype, masks_for, *, batch=2, seq=7, seed=0):
    """Specialize ``lm32`` cast to ``dtype`` and compare with the masked reference in ``dtype``
    and in float32 on the very same (rounded) weights."""
    lm = copy.deepcopy(lm32).to(dtype)
    ep, ids = export_lm(lm, batch=batch, seq=seq, seed=seed)
    exact_ep, _ = export_lm(copy.deepcopy(lm).float(), batch=batch, seq=seq, seed=seed)
    blocks = ifp.find_ffn_blocks(ep)
    masks = masks_for(blocks)
    masked = ifp.insert_masks(ep)
    small = ifp.specialize(masked, mask=masks)
    with torch.no_grad():
        ref = masked.module()(ids, masks)
        out = small.module()(ids)
        exact = ifp.insert_masks(exact_ep).module()(ids, masks)
    assert ref.dtype == out.dtype == dtype
    assert_within_rounding(out, ref, exact, dtype)
    assert ifp.count_parameters(small) == ifp.kept_parameters(masked, blocks, masks)
    assert {t.dtype for t in small.state_dict.values() if t.is_floating_point()} == {dtype}
    for key, (meta, real) in state_placeholder_shapes(small).items():
        assert meta == real, key
    return ep, masked, small


@settings(max_examples=examples(8))
@given(model=tiny_lms(), dtype=st.sampled_from(HALF), kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=4, max_size=4),
       seed=st.integers(0, 2**16))
def test_specialized_equals_masked_reference_in_half_precision(model, dtype, kinds, seed):
    lm, _ = model
    g = torch.Generator().manual_seed(seed)
    check_half(lm, dtype, lambda blocks: [make_mask(b.width, kinds[i % 4], g) for i, b in enumerate(blocks)], seed=seed)


@pytest.mark.parametrize("family", breadth(["llama", "gemma", "gpt2"], [f for f in HF_FAMILIES
                                                                      if f not in ("llama", "gemma", "gpt2")]))
def test_hf_families_in_bfloat16(family):
    g = torch.Generator().manual_seed(7)
    check_half(hf_model(family), torch.bfloat16,
               lambda blocks: [make_mask(b.width, k, g) for b, k in zip(blocks, ["soft", "binary"])])


@pytest.mark.parametrize("dtype", HALF)
def test_all_ones_masks_are_bitwise_identical_in_half_precision(dtype):
    ep, ids = export_lm(hf_model("llama").to(dtype))
    masked = ifp.insert_masks(ep)
    ones = [torch.ones(b.width) for b in ifp.find_ffn_blocks(masked)]
    with torch.no_grad():
        assert torch.equal(masked.module()(ids, ones), ep.module()(ids))
        assert torch.equal(ifp.specialize(masked, mask=ones).module()(ids), ep.module()(ids))


@pytest.mark.parametrize("dtype", HALF)
def test_soft_values_are_folded_in_float32_and_rounded_once(dtype):
    lm = hf_model("llama").to(dtype)
    ep, _ = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(3)
    masks = [make_mask(b.width, "soft", g) for b in blocks]
    small = ifp.specialize(ep, mask=masks)
    for i, (layer, m) in enumerate(zip(lm.model.layers, masks)):
        keep = m.nonzero().flatten()
        down = small.state_dict[f"lm.model.layers.{i}.mlp.down_proj.weight"]
        expected = (layer.mlp.down_proj.weight[:, keep].float() * m[keep]).to(dtype)
        assert torch.equal(down, expected)
        # rounding the mask to the dtype first (or multiplying in the dtype) is a different
        # result: the fold really is float32
        assert not torch.equal(down, layer.mlp.down_proj.weight[:, keep] * m[keep].to(dtype))
        up = small.state_dict[f"lm.model.layers.{i}.mlp.up_proj.weight"]
        assert torch.equal(up, layer.mlp.up_proj.weight[keep])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_masks_of_another_float_dtype_are_accepted(dtype):
    ep, ids = export_lm(hf_model("llama").to(torch.bfloat16))
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(1)
    masks = [make_mask(b.width, "soft", g).to(dtype).float() for b in blocks]  # values representable in dtype
    want = ifp.specialize(ep, mask=masks)
    got = ifp.specialize(ep, mask=[m.to(dtype) for m in masks])
    assert want.state_dict.keys() == got.state_dict.keys()
    for k in want.state_dict:
        assert torch.equal(want.state_dict[k], got.state_dict[k]), k


def test_a_mask_without_values_is_refused():
    ep, _ = export_lm(hf_model("llama").to(torch.bfloat16))
    blocks = ifp.find_ffn_blocks(ep)
    masks = [torch.ones(b.width) for b in blocks]
    masks[1] = torch.ones(blocks[1].width, device="meta")
    with pytest.raises(ifp.MaskError, match=r"mask for FFN block 1 .* is on the meta device"):
        ifp.specialize(ep, mask=masks)
    masks[1] = torch.ones(blocks[1].width, dtype=torch.int32)
    with pytest.raises(ifp.MaskError, match=r"mask for FFN block 1 .* has dtype torch.int32"):
        ifp.specialize(ep, mask=masks)


@pytest.mark.parametrize("dtype", breadth([torch.bfloat16], [torch.float16]))
def test_instruction_specialization_with_both_predictors_in_half_precision(dtype):
    from ifp_compile.predictors import IFPredictor, LMEncoder, PromptActivationPredictor

    torch.manual_seed(0)
    lm = hf_model("llama", inter=48, layers=2).to(dtype)
    ep = ifp.export(lm, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    widths = [b.width for b in ifp.find_ffn_blocks(ep)]
    ifp_pred = IFPredictor(LMEncoder(lm, num_layers=1), widths, keep=0.5)
    with torch.no_grad():
        for p in ifp_pred.head.parameters():
            p.normal_(0, 0.5)
    instr = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    x = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    exact = ifp.insert_masks(ifp.export(copy.deepcopy(lm).float(), (x,)))
    for pred in (PromptActivationPredictor(ep, keep=0.5), ifp_pred):
        program = ifp.insert_masks(ep, predictor=pred)
        small = ifp.specialize(program, instr)
        with torch.no_grad():
            masks = pred(instr)
            assert all(m.dtype == torch.float32 for m in masks)  # the predictor's scores are float32
            ref = program.module()(x, instr)
            assert ref.dtype == dtype
            assert_within_rounding(small.module()(x), ref, exact.module()(x, masks), dtype)
        kept = [int((m != 0).sum()) for m in masks]
        assert kept == [24, 24]


def test_head_masks_in_bfloat16():
    """Attention heads (insert_masks(heads=True), head_mask=) in bf16, within the same bound."""
    lm = hf_model("llama").to(torch.bfloat16)
    ep, ids = export_lm(lm)
    exact_ep, _ = export_lm(copy.deepcopy(lm).float())
    blocks, attention = ifp.find_ffn_blocks(ep), ifp.find_attention_blocks(ep)
    assert len(attention) == 2
    g = torch.Generator().manual_seed(6)
    masks = [make_mask(b.width, "soft", g) for b in blocks]
    heads = [torch.tensor([1.0, 0.0]), torch.tensor([0.7, 1.3])]  # drop a kv group; soft values into W_o
    masked = ifp.insert_masks(ep, heads=True)
    small = ifp.specialize(masked, mask=masks, head_mask=heads)
    with torch.no_grad():
        ref = masked.module()(ids, masks, heads)
        exact = ifp.insert_masks(exact_ep, heads=True).module()(ids, masks, heads)
        assert_within_rounding(small.module()(ids), ref, exact, torch.bfloat16)
    assert ifp.count_parameters(small) == ifp.kept_parameters(masked, blocks + attention, masks + heads)
