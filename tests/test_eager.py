"""to_module: the eager model with specialised widths equals the specialised program and
decodes with its KV cache."""

from __future__ import annotations

import pytest
import torch

import ifp_compile as ifp
from tests.helpers import breadth, export_lm, make_mask
from tests.zoo import hf_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3", "gpt2"])
def test_to_module_equals_specialized_program_and_generates(family):
    model = hf_model(family)
    if family == "gpt2":
        model.config.pad_token_id = 0
    ep, ids = export_lm(model, dynamic=True)
    g = torch.Generator().manual_seed(0)
    ffn = [make_mask(b.width, kind, g) for b, kind in zip(ifp.find_ffn_blocks(ep), ["soft", "binary"])]
    attention = ifp.find_attention_blocks(ep)
    heads = [make_mask(a.width, "one", g) for a in attention]
    heads[1] = torch.linspace(0.5, 1.5, attention[1].width)  # soft values fold into o columns
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = to_module = ifp.to_module(model, ep, mask=ffn, head_mask=heads)
    program = ifp.specialize(ep, mask=ffn, head_mask=heads)
    with torch.no_grad():
        torch.testing.assert_close(to_module(input_ids=ids).logits, program.module()(ids), rtol=1e-5, atol=2e-5)
    assert sum(p.numel() for p in small.parameters()) == ifp.count_parameters(program)
    assert type(small) is type(model)
    assert sum(p.numel() for p in model.parameters()) == ifp.count_parameters(ep)  # source untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    source_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not any(p.untyped_storage().data_ptr() in source_storage for p in small.parameters())  # nothing shared
    prompt = ids[:, :4]  # the program was exported with batch 2
    with torch.no_grad():
        cached = small.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        seq = prompt
        for _ in range(6):  # greedy decode without any cache, through the specialised program
            seq = torch.cat([seq, program.module()(seq)[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == seq.tolist()


def test_to_module_errors():
    model = hf_model("llama")
    ep, _ = export_lm(model)
    with pytest.raises(ifp.MaskError, match="head_mask for attention block 0 .* keeps no key/value head"):
        ifp.to_module(model, ep, head_mask=[torch.zeros(2), torch.ones(2)])
    with pytest.raises(ifp.MaskError, match="got 1 masks for 2 FFN blocks"):
        ifp.to_module(model, ep, mask=[torch.ones(64)])
    with pytest.raises(ifp.IFPError, match="is not a parameter of the model"):
        ifp.to_module(hf_model("qwen2", layers=1), ep, mask=[torch.ones(64)] * 2)


@pytest.mark.parametrize("dtype", breadth([torch.bfloat16], [torch.float16]))
def test_to_module_in_half_precision_holds_the_specialized_weights(dtype):
    model = hf_model("llama").to(dtype)
    ep, ids = export_lm(model, dynamic=True)
    g = torch.Generator().manual_seed(4)
    ffn = [make_mask(b.width, kind, g) for b, kind in zip(ifp.find_ffn_blocks(ep), ["soft", "binary"])]
    small = ifp.to_module(model, ep, mask=ffn)
    program = ifp.specialize(ep, mask=ffn)
    names = dict(small.named_parameters())
    for key, t in program.state_dict.items():  # the same slices, folded the same way, bit for bit
        assert names[key.removeprefix("lm.")].dtype == dtype
        assert torch.equal(names[key.removeprefix("lm.")], t), key
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids).logits, program.module()(ids))
        out = small.generate(ids[:, :4], max_new_tokens=4, do_sample=False, use_cache=True)
    assert out.shape == (2, 8)
