"""Adapt-Pruner, first part: decoder-layer boundaries found structurally, layer
importance from the residual stream, and the sparsity update formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ifp_compile as ifp
from ifp_compile.adapt import layer_cosines, layer_importance, normalise_importance, sparsity_schedule, update_sparsity
from ifp_compile.errors import IFPError
from ifp_compile.passes.layer_probe import layer_probe
from tests.zoo import VOCAB, _hf


@given(family=st.sampled_from(["llama", "qwen2", "gemma", "phi3", "gpt2"]), seed=st.integers(0, 1000))
def test_probe_matches_the_models_own_hidden_states(family, seed):
    """in_i / out_i are exactly HF's hidden_states[i] / [i + 1] (the last layer's output
    is compared before HF's final norm, which HF folds into its last entry)."""
    torch.manual_seed(seed)
    model = _hf(family, layers=3)
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    probe, bounds = layer_probe(ep)
    assert len(bounds) == 3
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        outs = probe(ids)
        hs = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(3):
        torch.testing.assert_close(outs[2 * i], hs[i], rtol=1e-5, atol=1e-5)
        if i < 2:
            torch.testing.assert_close(outs[2 * i + 1], hs[i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outs[2 * i + 1], outs[2 * i + 2] if i < 2 else outs[5], rtol=0, atol=0)


def test_identity_layer_is_least_important_and_pruned_most():
    torch.manual_seed(0)
    model = _hf("llama", layers=3)
    with torch.no_grad():  # layer 1 writes nothing to the residual stream: the identity
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    calib = [torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    cos = layer_cosines(ep, calib)
    assert cos[1] == pytest.approx(1.0, abs=1e-6) and max(cos[0], cos[2]) < 0.999
    imp = layer_importance(ep, calib)
    assert imp[1] == -1.0 and min(imp) == imp[1] and max(abs(v) for v in imp) == 1.0
    s = sparsity_schedule([imp] * 5, target=0.5)[-1]
    assert s[1] == max(s) and s[1] > 0.5 > min(s)


def test_update_formula_by_hand():
    # delta = 0.5 / 5 = 0.1, A = 0.03
    assert update_sparsity([0.1, 0.2, 0.0], [1.0, -1.0, 0.0], target=0.5, steps=5) == pytest.approx([0.17, 0.33, 0.1])
    # clipped to [0, 0.99]
    assert update_sparsity([0.0, 0.98], [1.0, -1.0], target=0.1, steps=10, amplitude=0.5) == [0.0, 0.99]
    # equal importances: every layer reaches the target after `steps` steps
    assert sparsity_schedule([[0.0, 0.0]] * 4, target=0.4)[-1] == pytest.approx([0.4, 0.4])


def test_importance_normalisation_by_hand():
    assert normalise_importance([0.9, 0.7, 0.8]) == pytest.approx([-1.0, 1.0, 0.0])  # raw 0.1, 0.3, 0.2
    assert normalise_importance([0.5, 0.5]) == [0.0, 0.0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(target=1.0, steps=5), "target sparsity must be in \\(0, 1\\), got 1.0"),
    (dict(target=0.5, steps=0), "steps must be a positive int, got 0"),
])
def test_bad_schedule_inputs(kwargs, message):
    with pytest.raises(IFPError, match=message):
        update_sparsity([0.0], [0.0], **kwargs)
    with pytest.raises(IFPError, match="importance of layer 0 is 2.0, outside \\[-1, 1\\]"):
        update_sparsity([0.0], [2.0], target=0.5, steps=2)


def test_no_calibration_data_is_named():
    ep = ifp.export(_hf("llama"), (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    with pytest.raises(IFPError, match="needs calibration data"):
        layer_cosines(ep, [])
