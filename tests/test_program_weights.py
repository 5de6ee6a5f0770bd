"""A program stored apart from its parameters: the weightless archive plus safetensors
files give back the very program, and anything missing or mismatched is named."""

from __future__ import annotations

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.program_weights import (
    WeightsError,
    bind_parameters,
    own_parameters,
    parameters,
    read_parameters,
    weightless,
    write_parameters,
)
from tests.helpers import export_lm
from tests.zoo import hf_model


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D weights, tied embedding and LM head
def test_weightless_archive_plus_parameter_files_is_the_program(family, tmp_path):
    ep, ids = export_lm(hf_model(family), dynamic=True)
    g = torch.Generator().manual_seed(0)
    small = ifp.specialize(ep, mask=[(torch.rand(b.width, generator=g) < 0.5).float()
                                     for b in ifp.find_ffn_blocks(ep)])
    own = own_parameters(small, ep)
    # the sliced FFN weights and nothing else are the task's own
    sliced = {p.key for b in ifp.find_ffn_blocks(ep) for p in b.params}
    assert set(own) == sliced
    torch.export.save(weightless(small), str(tmp_path / "p.pt2"))
    base_sha = write_parameters(parameters(ep), tmp_path / "base.safetensors")
    write_parameters(own, tmp_path / "own.safetensors")
    loaded = torch.export.load(str(tmp_path / "p.pt2"))
    assert all(p.device.type == "meta" for p in loaded.parameters())
    assert not any(n.meta.get(k) for n in loaded.graph.nodes for k in ("stack_trace", "nn_module_stack"))
    bound = bind_parameters(loaded, ("own", read_parameters(tmp_path / "own.safetensors")),
                            ("base", read_parameters(tmp_path / "base.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(bound.module()(ids), small.module()(ids), rtol=0, atol=0)
        longer = torch.randint(0, 100, (2, 11), generator=g)  # still dynamic
        torch.testing.assert_close(bound.module()(longer), small.module()(longer), rtol=0, atol=0)
    assert ifp.count_parameters(bound) == ifp.count_parameters(small)
    # byte-identical when written again
    assert write_parameters(parameters(ep), tmp_path / "again.safetensors") == base_sha


def test_a_tensor_shared_by_two_names_is_stored_once(tmp_path):
    from safetensors.torch import load_file

    w = torch.randn(8, 4)
    write_parameters({"embed.weight": w, "lm_head.weight": w, "other": torch.randn(3)}, tmp_path / "t.safetensors")
    assert sorted(load_file(tmp_path / "t.safetensors")) == ["embed.weight", "other"]
    back = read_parameters(tmp_path / "t.safetensors")
    assert torch.equal(back["embed.weight"], w) and torch.equal(back["lm_head.weight"], w)
    assert back["embed.weight"] is back["lm_head.weight"]  # read once, shared like the original
    # a limited read: only the names asked for (and held), an alias through its target
    part = read_parameters(tmp_path / "t.safetensors", names={"lm_head.weight", "missing"})
    assert list(part) == ["lm_head.weight"] and torch.equal(part["lm_head.weight"], w)


def test_missing_and_mismatched_parameters_are_named(tmp_path):
    ep, _ = export_lm(hf_model("llama"))
    g = torch.Generator().manual_seed(0)
    small = ifp.specialize(ep, mask=[(torch.rand(b.width, generator=g) < 0.5).float()
                                     for b in ifp.find_ffn_blocks(ep)])
    light = weightless(small)
    with pytest.raises(WeightsError, match=r"21 parameter\(s\) of the program are in none of own.safetensors, "
                                           r"x.safetensors: lm.model.embed_tokens.weight, .* \.\.\.$"):
        bind_parameters(light, ("own.safetensors", {}), ("x.safetensors", {}))
    with pytest.raises(WeightsError, match=r"lm.model.layers.0.mlp.gate_proj.weight in base.safetensors: "
                                           r"\(64, 32\) torch.float32, the program needs \(\d+, 32\)"):
        bind_parameters(light, ("base.safetensors", parameters(ep)))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk.safetensors: not a readable parameters file"):
        read_parameters(tmp_path / "junk.safetensors")
