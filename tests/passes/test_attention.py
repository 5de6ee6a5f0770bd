"""Attention heads as a second structure: discovery, head masks, specialisation.

Proof obligation: query heads are independent through softmax, so for a head mask m
with kept groups S,
    W_o (a * repeat(m)) = W_o[:, cols(S)] diag(repeat(m_S)) a_S(x)
and a_S needs only the q rows of S's query heads and the k/v rows of S's kv heads.
Checked here over random GQA configurations and head masks, with exact parameter counts.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ifp_compile as ifp
from tests.helpers import export_lm, make_mask, state_placeholder_shapes
from tests.zoo import HF_FAMILIES, HandMLP, TinyLM, hf_model

MASK_KINDS = ["all", "none", "one", "binary", "soft"]


@st.composite
def gqa_lms(draw):
    n_layers = draw(st.integers(1, 3))
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    hd = draw(st.sampled_from([2, 4]))
    kw = dict(d=n_heads * hd, widths=tuple(draw(st.lists(st.integers(1, 12), min_size=n_layers, max_size=n_layers))),
              gated=draw(st.booleans()), act="silu", bias=draw(st.booleans()), n_heads=n_heads, n_kv=n_kv)
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return TinyLM(**kw).eval(), kw


def check_heads(ep, ids, ffn_masks, head_masks, longer=None):
    """specialize(masked) == masked reference, exact counts, consistent metadata."""
    masked = ifp.insert_masks(ep, heads=True)
    small = ifp.specialize(masked, mask=ffn_masks, head_mask=head_masks)
    with torch.no_grad():
        torch.testing.assert_close(small.module()(ids), masked.module()(ids, ffn_masks, head_masks), rtol=1e-5, atol=2e-5)
        if longer is not None:  # the sequence axis stays dynamic
            torch.testing.assert_close(small.module()(longer), masked.module()(longer, ffn_masks, head_masks),
                                       rtol=1e-5, atol=2e-5)
    blocks = ifp.find_ffn_blocks(masked) + ifp.find_attention_blocks(masked)
    assert ifp.count_parameters(small) == ifp.kept_parameters(masked, blocks, list(ffn_masks) + list(head_masks))
    for key, (meta, real) in state_placeholder_shapes(small).items():
        assert meta == real, key
    for n in small.graph.nodes:  # every node's value metadata was refreshed
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and n.op == "call_function":
            assert all(isinstance(s, torch.SymInt) or s >= 0 for s in v.shape), n.name
    assert [n.name for n in small.graph.nodes if n.op == "placeholder" and "masks" in n.name] == []
    return masked, small


@given(model=gqa_lms(), kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=3, max_size=3),
       ffn_kind=st.sampled_from(MASK_KINDS), seed=st.integers(0, 2**16))
def test_head_specialized_equals_masked_reference_random_gqa(model, kinds, ffn_kind, seed):
    lm, kw = model
    ep, ids = export_lm(lm, batch=2, seq=5, seed=seed, dynamic=True)
    attention = ifp.find_attention_blocks(ep)
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in attention] == [
        (kw["n_heads"], kw["n_kv"], kw["d"] // kw["n_heads"])] * len(kw["widths"])
    g = torch.Generator().manual_seed(seed)
    head_masks = [make_mask(a.num_kv_heads, kinds[i % 3], g) for i, a in enumerate(attention)]
    ffn_masks = [make_mask(b.width, ffn_kind, g) for b in ifp.find_ffn_blocks(ep)]
    check_heads(ep, ids, ffn_masks, head_masks, longer=torch.randint(0, 128, (2, 9), generator=g))


_HF = {}


def _hf_program(family, **kw):
    key = (family, tuple(sorted(kw.items())))
    if key not in _HF:
        _HF[key] = export_lm(hf_model(family, **kw), dynamic=True)
    return _HF[key]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_hf_families_heads_are_found_and_specialize(family):
    ep, ids = _hf_program(family)
    attention = ifp.find_attention_blocks(ep)
    kv = 4 if family.startswith("gpt2") else 2  # GPT-2 has no GQA
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in attention] == [(4, kv, 8)] * 2
    g = torch.Generator().manual_seed(1)
    head_masks = [make_mask(kv, "binary", g), make_mask(kv, "soft", g)]
    head_masks[0][0] = 0.0  # at least one group goes
    ffn_masks = [make_mask(b.width, "binary", g) for b in ifp.find_ffn_blocks(ep)]
    check_heads(ep, ids, ffn_masks, head_masks, longer=torch.randint(0, 128, (2, 11), generator=g))


@pytest.mark.parametrize("kv", [1, 4])
def test_multi_query_and_full_multi_head_attention(kv):
    ep, ids = _hf_program("llama", heads=4, kv_heads=kv)
    (a, _) = ifp.find_attention_blocks(ep)
    assert (a.num_heads, a.num_kv_heads, a.heads_per_group) == (4, kv, 4 // kv)
    g = torch.Generator().manual_seed(2)
    check_heads(ep, ids, [torch.ones(64)] * 2, [make_mask(kv, "one", g), torch.zeros(kv)])


def test_all_ones_head_masks_are_bitwise_identical():
    ep, ids = _hf_program("llama")
    masked = ifp.insert_masks(ep, heads=True)
    with torch.no_grad():
        ref = ep.module()(ids)
        out = masked.module()(ids, [torch.ones(64)] * 2, [torch.ones(2)] * 2)
    assert torch.equal(ref, out)


def test_zero_head_mask_means_that_group_contributes_nothing():
    """Independent of the passes: zeroing a group's value rows silences exactly that group."""
    torch.manual_seed(0)
    lm = TinyLM(d=12, widths=(8,), n_heads=6, n_kv=3, bias=False).eval()
    ids = torch.randint(0, 128, (2, 6))
    silenced = TinyLM(d=12, widths=(8,), n_heads=6, n_kv=3, bias=False).eval()
    silenced.load_state_dict(lm.state_dict())
    with torch.no_grad():
        silenced.attn[0].v.weight[2:4] = 0.0  # kv head 1 (head_dim 2) -> query heads 2, 3
    ep = ifp.export(lm, (ids,))
    masked = ifp.insert_masks(ep, heads=True)
    with torch.no_grad():
        out = masked.module()(ids, [torch.ones(8)], [torch.tensor([1.0, 0.0, 1.0])])
        torch.testing.assert_close(out, silenced(ids), rtol=1e-5, atol=1e-5)


def test_parameter_count_by_hand_for_one_removed_group():
    lm = TinyLM(d=12, widths=(8,), n_heads=6, n_kv=3, bias=True).eval()
    ep, ids = export_lm(lm)
    _, small = check_heads(ep, ids, [torch.ones(8)], [torch.tensor([1.0, 0.0, 1.0])])
    # group = 2 query heads (q rows 2*2*12 + bias 4), k and v rows (2*12 + 2 each), o columns 4*12
    per_group = (4 * 12 + 4) + 2 * (2 * 12 + 2) + 4 * 12
    assert ifp.count_parameters(ep) - ifp.count_parameters(small) == per_group
    (a,) = ifp.find_attention_blocks(ep)
    assert a.params_per_channel() == per_group
    assert small.state_dict["attn.0.q.weight"].shape == (8, 12)
    assert small.state_dict["attn.0.k.weight"].shape == (4, 12)
    assert small.state_dict["attn.0.o.weight"].shape == (12, 8)


def test_head_pruned_program_saves_loads_and_exports_to_onnx(tmp_path):
    ep, ids = _hf_program("qwen2")
    small = ifp.specialize(ep, head_mask=[torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])])
    path = tmp_path / "small.pt2"
    torch.export.save(small, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(ids), small.module()(ids))
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from ifp_compile.onnx import export_onnx

    proto = export_onnx(small)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0]),
                                   small.module()(ids), rtol=1e-5, atol=2e-5)


class EagerAttention(nn.Module):
    """Attention written as matmul + softmax: not recognised (only the sdpa kernel is)."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Embedding(128, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 16), nn.Linear(16, d)

    def forward(self, ids):
        x = self.embed(ids)
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        x = x + self.o(a)
        return x + self.down(torch.relu(self.up(x)))


def test_unrecognised_attention_keeps_ffn_pruning_and_says_so():
    ids = torch.randint(0, 128, (1, 5))
    ep = ifp.export(EagerAttention(), (ids,))
    assert ifp.find_attention_blocks(ep) == []
    assert len(ifp.find_ffn_blocks(ep)) == 1
    with pytest.raises(ifp.ProgramError, match="(?s)no attention block was recognised.*scaled_dot_product_attention"):
        ifp.insert_masks(ep, heads=True)
    with pytest.raises(ifp.ProgramError, match="no attention block was recognised"):
        ifp.specialize(ep, head_mask=[torch.ones(1)])
    ifp.specialize(ep, mask=[torch.ones(16)])  # FFN-only still works


def test_bad_head_masks_are_refused_with_the_block_named():
    ep, ids = _hf_program("llama")
    with pytest.raises(ifp.MaskError, match="got 1 masks for 2 attention blocks"):
        ifp.specialize(ep, head_mask=[torch.ones(2)])
    with pytest.raises(ifp.MaskError, match=r"head_mask for attention block 1 .*self_attn.* has shape \(4,\), expected \(2,\)"):
        ifp.specialize(ep, head_mask=[torch.ones(2), torch.ones(4)])
    masked = ifp.insert_masks(ep, heads=True)
    with pytest.raises(ifp.MaskError, match="head mask inputs.*pass head_mask="):
        ifp.specialize(masked, mask=[torch.ones(64)] * 2)
    with pytest.raises(ifp.ProgramError, match="without a predictor"):
        ifp.insert_masks(ep, predictor=nn.Identity(), heads=True)
    with pytest.raises(ifp.ProgramError, match="no attention block"):
        ifp.insert_masks(ifp.export(HandMLP(), (torch.randn(1, 16),)), heads=True)
