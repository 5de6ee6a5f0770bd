"""The masked reference program: valid, round-trips, identical with all-ones masks."""

from __future__ import annotations

import copy

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.predictors import MaskPredictor
from tests.helpers import export_lm, make_mask, state_placeholder_shapes
from tests.zoo import HF_FAMILIES, hf_model


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_all_ones_is_bitwise_identical_and_program_is_valid(family, tmp_path):
    ep, ids = export_lm(hf_model(family))
    blocks = ifp.find_ffn_blocks(ep)
    masked = ifp.insert_masks(ep)
    masked.validate()
    assert masked.graph_signature.user_inputs == ("input_ids",) + tuple(f"ffn_masks_{b.index}" for b in blocks)
    ones = [torch.ones(b.width) for b in blocks]
    with torch.no_grad():
        assert torch.equal(masked.module()(ids, ones), ep.module()(ids))
    for key, (meta, real) in state_placeholder_shapes(masked).items():
        assert meta == real, key
    for n in masked.graph.nodes:
        if n.op == "call_function":
            assert "val" in n.meta, n.name
    path = tmp_path / "masked.pt2"
    torch.export.save(masked, path)
    loaded = torch.export.load(path)
    masks = [make_mask(b.width, "soft", torch.Generator().manual_seed(0)) for b in blocks]
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(ids, masks), masked.module()(ids, masks), rtol=0, atol=0)


def test_masked_program_matches_eager_model_with_masked_down_columns():
    lm = hf_model("llama")
    ep, ids = export_lm(lm)
    masked = ifp.insert_masks(ep)
    g = torch.Generator().manual_seed(2)
    masks = [make_mask(64, "soft", g) for _ in range(2)]
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        for layer, m in zip(reference.model.layers, masks):
            layer.mlp.down_proj.weight.mul_(m)  # W_down (m * h) == (W_down diag(m)) h
        expected = reference(ids, use_cache=False).logits
        torch.testing.assert_close(masked.module()(ids, masks), expected, rtol=1e-5, atol=1e-5)


def test_masks_multiply_right_before_down_projection():
    ep, _ = export_lm(hf_model("gpt2"))
    masked = ifp.insert_masks(ep)
    for b in ifp.find_ffn_blocks(masked):
        nodes = {n.name: n for n in masked.graph.nodes}
        mul = nodes[b.mask_node]
        assert mul.target is torch.ops.aten.mul.Tensor
        assert nodes[b.mask_source].name == f"ffn_masks_{b.index}"
        down = nodes[b.down_node]
        assert mul in down.all_input_nodes


def test_caller_program_is_not_modified():
    ep, ids = export_lm(hf_model("phi3"))
    before = [n.format_node() for n in ep.graph.nodes]
    ifp.insert_masks(ep)
    assert [n.format_node() for n in ep.graph.nodes] == before


def test_double_insertion_is_refused():
    ep, _ = export_lm(hf_model("llama"))
    masked = ifp.insert_masks(ep)
    with pytest.raises(ifp.ProgramError, match="already has masks"):
        ifp.insert_masks(masked)


class FixedPredictor(MaskPredictor):
    """A predictor whose masks depend on the instruction through a learned table."""

    def __init__(self, widths):
        super().__init__()
        self.widths = list(widths)
        self.table = torch.nn.Parameter(torch.randn(128, sum(widths)))

    def forward(self, instruction_ids):
        scores = self.table[instruction_ids[0]].mean(0)
        return [torch.relu(s) for s in scores.split(self.widths)]  # soft, some zeros


def test_predictor_branch_replaces_mask_inputs_and_specializes():
    ep, ids = export_lm(hf_model("gemma"), dynamic=True)
    blocks = ifp.find_ffn_blocks(ep)
    torch.manual_seed(0)
    pred = FixedPredictor([b.width for b in blocks])
    prog = ifp.insert_masks(ep, predictor=pred)
    assert prog.graph_signature.user_inputs == ("input_ids", "instruction_ids")
    instruction = torch.tensor([[5, 9, 17, 3]])
    with torch.no_grad():
        masks = pred(instruction)
        expected = ifp.insert_masks(ep).module()(ids, masks)
        torch.testing.assert_close(prog.module()(ids, instruction), expected, rtol=1e-5, atol=1e-5)
    small = ifp.specialize(prog, instruction)
    assert small.graph_signature.user_inputs == ("input_ids",)
    assert not any(k.startswith("predictor.") for k in small.state_dict)
    with torch.no_grad():
        torch.testing.assert_close(small.module()(ids), expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ifp.predict_masks(prog, ifp.find_ffn_blocks(prog), instruction), masks)


def _ranges(ep):
    """{user input: [(min, max) of each symbolic dim]} read off the range constraints."""
    out = {}
    for n in ep.graph.nodes:
        if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs:
            dims = [s for s in n.meta["val"].shape if isinstance(s, torch.SymInt)]
            out[n.name] = [(int(ep.range_constraints[d.node.expr].lower), str(ep.range_constraints[d.node.expr].upper))
                           for d in dims]
    return out


def test_dynamic_ranges_survive_insertion_and_specialization(tmp_path):
    """seq keeps export's [2, 4096]; the instruction length disappears with the branch."""
    ep, ids = export_lm(hf_model("llama"), dynamic=True)
    assert _ranges(ep) == {"input_ids": [(2, "4096")]}
    blocks = ifp.find_ffn_blocks(ep)
    masked = ifp.insert_masks(ep)
    assert _ranges(masked)["input_ids"] == [(2, "4096")]
    prog = ifp.insert_masks(ep, predictor=FixedPredictor([b.width for b in blocks]))
    assert _ranges(prog) == {"input_ids": [(2, "4096")], "instruction_ids": [(2, "int_oo")]}
    small = ifp.specialize(prog, torch.tensor([[5, 9, 17, 3]]))
    assert _ranges(small) == {"input_ids": [(2, "4096")]}
    assert len(small.range_constraints) == 1  # the instruction's symbol is gone
    path = tmp_path / "small.pt2"
    torch.export.save(small, path)
    assert _ranges(torch.export.load(path)) == {"input_ids": [(2, "4096")]}


def test_predictor_with_wrong_outputs_is_refused():
    ep, _ = export_lm(hf_model("llama"))
    bad = FixedPredictor([64])  # one mask for two blocks
    with pytest.raises(ifp.IFPError, match="returned 1 masks for a program with 2 FFN blocks"):
        ifp.insert_masks(ep, predictor=bad)
    wrong_width = FixedPredictor([64, 63])
    with pytest.raises(ifp.IFPError, match=r"FFN block 1 .* has shape \(63,\), expected \(64,\)"):
        ifp.insert_masks(ep, predictor=wrong_width)


class _KeywordInputs(torch.nn.Module):
    """A model exported with keyword inputs: the mask inputs must go between the positional
    and the keyword ones in the generated forward()."""

    def __init__(self):
        super().__init__()
        self.lm = hf_model("llama")

    def forward(self, input_ids, *, scale):
        return self.lm(input_ids=input_ids).logits * scale


def test_masks_are_inserted_into_a_program_with_keyword_inputs():
    model = _KeywordInputs().eval()
    ids, scale = torch.randint(0, 100, (1, 5)), torch.tensor(2.0)
    ep = torch.export.export(model, (ids,), {"scale": scale}, strict=False)
    masked = ifp.insert_masks(ep)
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(3)
    masks = [make_mask(b.width, "binary", g) for b in blocks]
    small = ifp.specialize(masked, mask=masks)
    with torch.no_grad():
        ref = masked.module()(ids, masks, scale=scale)
        torch.testing.assert_close(small.module()(ids, scale=scale), ref, rtol=1e-5, atol=1e-6)
        ones = [torch.ones(b.width) for b in blocks]
        assert torch.equal(masked.module()(ids, ones, scale=scale), ep.module()(ids, scale=scale))
