"""Bad input gets a clear error naming what and where; nothing is modified."""

from __future__ import annotations

import pytest
import torch

import ifp_compile as ifp
from tests.helpers import export_lm
from tests.zoo import hf_model


@pytest.fixture(scope="module")
def masked():
    ep, _ = export_lm(hf_model("llama"))
    return ifp.insert_masks(ep)


def ok_masks():
    return [torch.ones(64), torch.ones(64)]


@pytest.mark.parametrize(
    "masks, message",
    [
        ([torch.ones(64)], "got 1 masks for 2 FFN blocks"),
        (torch.ones(2, 64), "must be a list with one 1-D tensor per FFN block"),
        ([torch.ones(64), torch.ones(63)], r"FFN block 1 \(.*mlp\) has shape \(63,\), expected \(64,\)"),
        ([torch.ones(64), torch.ones(1, 64)], r"FFN block 1 .* has shape \(1, 64\)"),
        ([torch.ones(64, dtype=torch.int64), torch.ones(64)], "FFN block 0 .* has dtype torch.int64"),
        ([torch.ones(64), [1.0] * 64], "FFN block 1 .* must be a torch.Tensor, got list"),
        ([torch.ones(64), torch.full((64,), float("nan"))], "FFN block 1 .* non-finite value nan at channel 0"),
        ([torch.ones(64), torch.tensor([1.0] * 10 + [float("inf")] + [1.0] * 53)], "non-finite value inf at channel 10"),
        ([torch.tensor([1.0] * 3 + [-0.5] + [1.0] * 60), torch.ones(64)], "FFN block 0 .* negative value -0.5 at channel 3"),
    ],
)
def test_bad_masks(masked, masks, message):
    before = [n.format_node() for n in masked.graph.nodes]
    with pytest.raises(ifp.MaskError, match=message):
        ifp.specialize(masked, mask=masks)
    assert [n.format_node() for n in masked.graph.nodes] == before


def test_bool_masks_are_accepted(masked):
    small = ifp.specialize(masked, mask=[torch.arange(64) < 10, torch.arange(64) < 20])
    assert small.state_dict["lm.model.layers.1.mlp.up_proj.weight"].shape == (20, 32)


def test_instruction_without_predictor(masked):
    with pytest.raises(ifp.InstructionError, match="no predictor branch"):
        ifp.specialize(masked, "Solve this math word problem.", tokenizer=lambda s, **k: None)


def test_instruction_and_mask_both(masked):
    with pytest.raises(ifp.InstructionError, match="either an instruction or mask=, not both"):
        ifp.specialize(masked, "x", mask=ok_masks())


def test_neither_instruction_nor_mask(masked):
    with pytest.raises(ifp.InstructionError, match="needs an instruction"):
        ifp.specialize(masked)


def test_not_a_program():
    with pytest.raises(ifp.ProgramError, match="takes a torch.export.ExportedProgram, got Linear"):
        ifp.specialize(torch.nn.Linear(2, 2), mask=[])
    with pytest.raises(ifp.ProgramError, match="takes a torch.export.ExportedProgram"):
        ifp.insert_masks("model.pt2")


def test_export_argument_errors():
    with pytest.raises(ifp.ProgramError, match="example_args must be a tuple"):
        ifp.export(torch.nn.Linear(2, 2), torch.ones(2))
    with pytest.raises(ifp.ProgramError, match="takes an nn.Module"):
        ifp.export("not a model", (torch.ones(2),))


def test_all_errors_are_value_errors():
    for cls in (ifp.MaskError, ifp.InstructionError, ifp.NoFFNFoundError, ifp.ProgramError):
        assert issubclass(cls, ifp.IFPError) and issubclass(cls, ValueError)
