"""Structural FFN discovery over every architecture family the issue names."""

from __future__ import annotations

import pytest
import torch

import ifp_compile as ifp
from tests.helpers import export_lm
from tests.zoo import HandGLU, HandMLP, TinyLM, hf_model

# family -> (activation, gated, fused, {role: axis} for the in-projection weights, down axis)
EXPECTED = {
    "llama": ("silu", True, False, {"gate": 0, "up": 0}, 1),
    "qwen2": ("silu", True, False, {"gate": 0, "up": 0}, 1),
    "mistral": ("silu", True, False, {"gate": 0, "up": 0}, 1),
    "gemma": ("gelu_tanh", True, False, {"gate": 0, "up": 0}, 1),
    "phi3": ("silu", True, True, {"gate_up": 0}, 1),
    "gpt2": ("pointwise(pow,tanh)", False, False, {"up": 1}, 0),  # Conv1D: [in, out] weights
    "gpt2-gelu": ("gelu", False, False, {"up": 1}, 0),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_hf_families(family):
    act, gated, fused, in_axes, down_axis = EXPECTED[family]
    lm = hf_model(family, hidden=32, inter=48, layers=3)
    ep, _ = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    assert len(blocks) == 3
    assert [b.index for b in blocks] == [0, 1, 2]
    assert [b.position for b in blocks] == sorted(b.position for b in blocks)
    for i, b in enumerate(blocks):
        assert (b.width, b.activation, b.gated, b.fused_gate_up) == (48, act, gated, fused)
        assert f".{i}." in b.name + "."  # the module-path hint labels the layer
        roles = {p.role: p for p in b.params}
        for role, axis in in_axes.items():
            assert roles[role].axis == axis
            assert roles[role].offsets == ((0, 48) if fused else (0,))
        assert roles["down"].axis == down_axis
        assert b.shared_params == ()
    if family.startswith("gpt2"):
        assert {p.role for p in blocks[0].params} == {"up", "up_bias", "down"}
        assert blocks[0].down_bias.endswith("c_proj.bias")
    else:
        assert blocks[0].down_bias is None


def test_fused_gate_up_records_both_segments():
    lm = hf_model("phi3", hidden=32, inter=40, layers=1)
    ep, _ = export_lm(lm)
    (b,) = ifp.find_ffn_blocks(ep)
    (gate_up,) = [p for p in b.params if p.role == "gate_up"]
    assert gate_up.shape == (80, 32) and gate_up.offsets == (0, 40)
    assert gate_up.params_per_channel() == 64  # one row in each half
    assert b.params_per_channel() == 64 + 32


def test_llama_with_grouped_query_attention_is_not_mistaken_for_ffn():
    # 4 query heads, 1 kv head: q/k/v/o projections are linear, but no pointwise region
    lm = hf_model("llama", heads=4, kv_heads=1, layers=2)
    ep, _ = export_lm(lm)
    blocks = ifp.find_ffn_blocks(ep)
    assert len(blocks) == 2
    keys = {p.key for b in blocks for p in b.params}
    assert not any("self_attn" in k or "lm_head" in k for k in keys)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_hand_written_mlp(bias, act):
    model = HandMLP(d=16, widths=(32, 24), bias=bias, act=act).eval()
    ep = ifp.export(model, (torch.randn(2, 3, 16),))
    blocks = ifp.find_ffn_blocks(ep)
    assert [b.width for b in blocks] == [32, 24]
    assert all(not b.gated and b.activation == act for b in blocks)
    assert [b.name for b in blocks] == ["downs.0", "downs.1"]  # ambiguous hints get the index
    assert all((b.down_bias is not None) == bias for b in blocks)


def test_gated_operand_order_and_tanh_gelu():
    ep = ifp.export(HandGLU().eval(), (torch.randn(1, 4, 16),))
    (b,) = ifp.find_ffn_blocks(ep)
    assert b.gated and b.activation == "gelu_tanh"
    assert {p.role for p in b.params} == {"gate", "up", "down"}
    assert next(p for p in b.params if p.role == "gate").key == "gate.weight"


def test_mm_projection_with_transposed_weight():
    class MM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in = torch.nn.Parameter(torch.randn(20, 8))  # [out, in], used transposed
            self.w_out = torch.nn.Parameter(torch.randn(20, 8))  # [in, out]

        def forward(self, x):
            return x + torch.relu(x @ self.w_in.t()) @ self.w_out

    ep = ifp.export(MM().eval(), (torch.randn(5, 8),))
    (b,) = ifp.find_ffn_blocks(ep)
    axes = {p.key: p.axis for p in b.params}
    assert axes == {"w_in": 0, "w_out": 0}
    m = (torch.arange(20) < 7).float()
    x = torch.randn(5, 8)
    small = ifp.specialize(ep, mask=[m])
    torch.testing.assert_close(small.module()(x), ifp.insert_masks(ep).module()(x, [m]), rtol=1e-5, atol=1e-5)


def test_per_channel_parameter_inside_the_region_is_sliced():
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 10)
            self.scale = torch.nn.Parameter(torch.randn(10))
            self.down = torch.nn.Linear(10, 8)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)) * self.scale)

    ep = ifp.export(Scaled().eval(), (torch.randn(3, 8),))
    (b,) = ifp.find_ffn_blocks(ep)
    assert {p.key: p.role for p in b.params}["scale"] == "channel"
    m = (torch.arange(10) % 3 == 0).float()
    small = ifp.specialize(ep, mask=[m])
    assert small.state_dict["scale"].shape == (4,)


def test_no_ffn_error_names_the_patterns_tried():
    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(self.q(x), -1)

    ep = ifp.export(Attn(), (torch.randn(2, 8),))
    with pytest.raises(ifp.NoFFNFoundError, match="Patterns tried: gated FFN"):
        ifp.find_ffn_blocks(ep)
    assert ifp.find_ffn_blocks(ep, require=False) == []


def test_intermediate_used_outside_block_is_not_an_ffn():
    class Leaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 12)
            self.down = torch.nn.Linear(12, 8)

        def forward(self, x):
            h = torch.relu(self.up(x))
            return self.down(h), h.sum()  # h escapes: slicing it would change an output

    ep = ifp.export(Leaky(), (torch.randn(2, 8),))
    assert ifp.find_ffn_blocks(ep, require=False) == []


def test_find_rejects_non_programs():
    with pytest.raises(ifp.ProgramError, match="ExportedProgram"):
        ifp.find_ffn_blocks(torch.nn.Linear(2, 2))


def test_tiny_lm_widths_differ_per_layer():
    ep, _ = export_lm(TinyLM(widths=(5, 9, 1)).eval())
    assert [b.width for b in ifp.find_ffn_blocks(ep)] == [5, 9, 1]
