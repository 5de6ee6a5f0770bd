"""Capture: HF causal LMs become input_ids -> logits programs, cache off, eval mode."""

from __future__ import annotations

import torch

import ifp_compile as ifp
from tests.zoo import HandMLP, hf_model


def test_hf_model_exports_logits_only_and_restores_training_mode():
    lm = hf_model("llama")
    lm.train()
    ids = torch.randint(0, 128, (1, 5))
    ep = ifp.export(lm, (ids,))
    assert lm.training  # the caller's mode is restored
    assert ep.graph_signature.user_inputs == ("input_ids",)
    assert len(ep.graph_signature.user_outputs) == 1
    lm.eval()
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), lm(ids, use_cache=False).logits, rtol=0, atol=0)
    assert "lm.model.layers.0.mlp.down_proj.weight" in ep.state_dict


def test_dynamic_sequence_shortcut():
    lm = hf_model("qwen2")
    ep = ifp.export(lm, (torch.randint(0, 128, (1, 5)),), dynamic_shapes="seq")
    longer = torch.randint(0, 128, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(longer), lm(longer, use_cache=False).logits, rtol=1e-5, atol=1e-5)


def test_plain_module_is_exported_as_is():
    model = HandMLP()
    x = torch.randn(2, 3, 16)
    ep = ifp.export(model, (x,))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)
