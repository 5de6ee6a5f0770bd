"""Specialization is partial evaluation: specialized == masked reference.

Proof obligation (see ifp_compile/passes/specialize.py):
    W_down (m * h(x)) = W_down[:, S] diag(m_S) h_S(x)
checked over random architectures and masks, with exact parameter counts.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifp_compile as ifp
from tests.helpers import export_lm, make_mask, state_placeholder_shapes, tiny_lms
from tests.zoo import HF_FAMILIES, TinyLM, hf_model

MASK_KINDS = ["all", "none", "one", "binary", "soft"]


def check_equivalence(ep, ids, masks, blocks, atol=2e-5):
    masked = ifp.insert_masks(ep)
    with torch.no_grad():
        ref = masked.module()(ids, masks)
    small = ifp.specialize(masked, mask=masks)
    with torch.no_grad():
        out = small.module()(ids)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    assert ifp.count_parameters(small) == ifp.kept_parameters(masked, blocks, masks)
    # every placeholder's meta agrees with its tensor
    for key, (meta, real) in state_placeholder_shapes(small).items():
        assert meta == real, key
    # no mask op or mask input left
    assert [n for n in small.graph.nodes if n.op == "placeholder" and "ffn_masks" in n.name] == []
    assert small.graph_signature.user_inputs == ep.graph_signature.user_inputs
    return masked, small


@given(model=tiny_lms(), kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=4, max_size=4),
       batch=st.integers(1, 3), seq=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_specialized_equals_masked_reference_random_architectures(model, kinds, batch, seq, seed):
    lm, kw = model
    ep, ids = export_lm(lm, batch=batch, seq=seq, seed=seed)
    blocks = ifp.find_ffn_blocks(ep)
    assert [b.width for b in blocks] == list(kw["widths"])
    g = torch.Generator().manual_seed(seed)
    masks = [make_mask(b.width, kinds[i % len(kinds)], g) for i, b in enumerate(blocks)]
    check_equivalence(ep, ids, masks, blocks)


@pytest.mark.parametrize("family", HF_FAMILIES)
@given(kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_specialized_equals_masked_reference_hf_families(family, kinds, seed):
    ep, ids = _hf_program(family)
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(seed)
    masks = [make_mask(b.width, k, g) for b, k in zip(blocks, kinds)]
    check_equivalence(ep, ids, masks, blocks)


_HF_CACHE = {}


def _hf_program(family):
    if family not in _HF_CACHE:
        _HF_CACHE[family] = export_lm(hf_model(family))
    return _HF_CACHE[family]


def test_parameter_count_is_exact_by_hand():
    lm = TinyLM(d=8, widths=(10, 6), gated=True, bias=True, n_heads=2, n_kv=1).eval()
    ep, ids = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    masks = [torch.tensor([1.0] * 4 + [0.0] * 6), torch.zeros(6)]
    _, small = check_equivalence(ep, ids, masks, blocks)
    dense = ifp.count_parameters(ep)
    # per channel: gate row (8) + gate bias (1) + up row (8) + up bias (1) + down column (8) = 26
    assert ifp.count_parameters(small) == dense - 6 * 26 - 6 * 26
    sd = small.state_dict
    assert sd["ffn.0.gate.weight"].shape == (4, 8) and sd["ffn.0.down.weight"].shape == (8, 4)
    assert "ffn.1.up.weight" not in sd and "ffn.1.down.bias" in sd  # no channel left: only b_down


def test_soft_mask_values_are_folded_into_down_columns():
    lm = TinyLM(d=8, widths=(6,), gated=False, act="relu", bias=False, n_heads=2, n_kv=1).eval()
    ep, _ = export_lm(lm)
    m = torch.tensor([0.5, 0.0, 2.0, 0.0, 0.0, 1.0])
    small = ifp.specialize(ifp.insert_masks(ep), mask=[m])
    expected = lm.ffn[0].down.weight[:, [0, 2, 5]] * torch.tensor([0.5, 2.0, 1.0])
    torch.testing.assert_close(small.state_dict["ffn.0.down.weight"], expected, rtol=0, atol=0)
    torch.testing.assert_close(small.state_dict["ffn.0.up.weight"], lm.ffn[0].up.weight[[0, 2, 5]], rtol=0, atol=0)


def test_specialize_accepts_a_plain_program_with_masked_semantics():
    lm = hf_model("llama")
    ep, ids = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(1)
    masks = [make_mask(b.width, "soft", g) for b in blocks]
    small = ifp.specialize(ep, mask=masks)
    with torch.no_grad():
        ref = ifp.insert_masks(ep).module()(ids, masks)
        torch.testing.assert_close(small.module()(ids), ref, rtol=1e-5, atol=2e-5)


def test_unsliced_parameters_are_shared_and_source_is_untouched():
    lm = hf_model("qwen2")
    ep, ids = export_lm(lm)
    masked = ifp.insert_masks(ep)
    before = {k: v.clone() for k, v in masked.state_dict.items()}
    n_nodes = len(masked.graph.nodes)
    blocks = ifp.find_ffn_blocks(masked)
    g = torch.Generator().manual_seed(0)
    small = ifp.specialize(masked, mask=[make_mask(b.width, "soft", g) for b in blocks])
    sliced = {p.key for b in blocks for p in b.params}
    for k, v in small.state_dict.items():
        if k not in sliced:
            assert v.data_ptr() == masked.state_dict[k].data_ptr(), f"{k} was copied"
    for k, v in masked.state_dict.items():
        assert torch.equal(v, before[k]), f"{k} of the source changed"
    assert len(masked.graph.nodes) == n_nodes


def test_a_fully_kept_block_shares_its_weights():
    """All channels kept at 1.0: nothing to slice, so no copy (a build stores no FFN weights
    for that block). All kept but scaled: only the down projection, which carries the scale,
    is new."""
    lm = hf_model("llama")
    ep, ids = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    assert len(blocks) == 2
    scaled = torch.linspace(0.5, 1.5, blocks[1].width)
    small = ifp.specialize(ep, mask=[torch.ones(blocks[0].width), scaled])
    shared = {k for k, v in small.state_dict.items() if v.data_ptr() == ep.state_dict[k].data_ptr()}
    assert {p.key for p in blocks[0].params} <= shared
    assert [p.role for p in blocks[1].params if p.key not in shared] == ["down"]
    with torch.no_grad():
        ref = ifp.insert_masks(ep).module()(ids, [torch.ones(blocks[0].width), scaled])
        torch.testing.assert_close(small.module()(ids), ref, rtol=1e-5, atol=2e-5)


def test_specialized_program_saves_loads_and_is_dynamic(tmp_path):
    lm = hf_model("gpt2")
    ep, ids = export_lm(lm, dynamic=True)
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(3)
    masks = [make_mask(b.width, "binary", g) for b in blocks]
    small = ifp.specialize(ifp.insert_masks(ep), mask=masks)
    path = tmp_path / "small.pt2"
    torch.export.save(small, path)
    loaded = torch.export.load(path)
    longer = torch.randint(0, 128, (2, 11))  # batch is static (2), sequence is dynamic
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(longer), small.module()(longer), rtol=0, atol=0)
        ref = ifp.insert_masks(ep).module()(longer, masks)
        torch.testing.assert_close(small.module()(longer), ref, rtol=1e-5, atol=2e-5)


def test_specialized_program_exports_to_onnx():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    lm = hf_model("llama")
    ep, ids = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    masks = [make_mask(b.width, "soft", torch.Generator().manual_seed(5)) for b in blocks]
    small = ifp.specialize(ifp.insert_masks(ep), mask=masks)
    onnx_program = torch.onnx.export(small, dynamo=True)
    buf = io.BytesIO()
    onnx.save(onnx_program.model_proto, buf)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), small.module()(ids), rtol=1e-4, atol=1e-4)


def test_shared_ffn_weight_gets_a_private_sliced_copy():
    class Shared(torch.nn.Module):
        """Block 1's up weight also feeds an auxiliary projection outside any FFN."""

        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 12)
            self.down = torch.nn.Linear(12, 8)

        def forward(self, x):
            h = self.down(torch.relu(self.up(x)))
            aux = torch.nn.functional.linear(x, self.up.weight).sum(-1, keepdim=True)
            return x + h + aux

    model = Shared().eval()
    x = torch.randn(2, 3, 8)
    ep = ifp.export(model, (x,))
    with pytest.warns(UserWarning, match="also used outside the block"):
        blocks = ifp.find_ffn_blocks(ep)
    assert blocks[0].shared_params == ("up.weight",)
    m = (torch.arange(12) % 2 == 0).float()
    with pytest.warns(UserWarning):
        small = ifp.specialize(ep, mask=[m])
    assert small.state_dict["up.weight"].shape == (12, 8)  # the shared original, intact
    assert small.state_dict["up.weight_ifp_ffn0"].shape == (6, 8)
    with torch.no_grad():
        with pytest.warns(UserWarning):
            ref = ifp.insert_masks(ep).module()(x, [m])
        torch.testing.assert_close(small.module()(x), ref, rtol=1e-5, atol=1e-5)
