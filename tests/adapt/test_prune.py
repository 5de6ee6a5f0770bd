"""Static adaptive pruning of FFN channels: channel scores, masks, the whole schedule."""

from __future__ import annotations

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.adapt import adaptive_masks, channel_scores, masks_for_sparsity
from ifp_compile.errors import IFPError
from tests.zoo import VOCAB, _hf


@pytest.fixture(scope="module")
def identity_middle():
    """3 Llama layers; layer 1 writes nothing to the residual stream (the identity)."""
    torch.manual_seed(0)
    model = _hf("llama", layers=3)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)  # near-identity, channels still rankable
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    calib = [torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return model, ep, calib


def test_magnitude_scores_by_hand(identity_middle):
    model, ep, _ = identity_middle
    mlp = model.model.layers[0].mlp
    expected = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                + mlp.down_proj.weight.abs().sum(0)).double()
    torch.testing.assert_close(channel_scores(ep)[0], expected.detach())


def test_taylor_scores_by_hand(identity_middle):
    model, ep, calib = identity_middle
    ids = calib[0]
    model.zero_grad()
    logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    mlp = model.model.layers[2].mlp
    expected = ((mlp.gate_proj.weight * mlp.gate_proj.weight.grad).abs().sum(1)
                + (mlp.up_proj.weight * mlp.up_proj.weight.grad).abs().sum(1)
                + (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(0)).double()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(channel_scores(ep, "taylor", [ids])[2], expected.detach(), rtol=1e-4, atol=1e-9)


def test_activation_scores_by_hand(identity_middle):
    """GRIFFIN's rule: per-token unit rows of h(x) = silu(gate) * up, then each column's norm."""
    model, ep, calib = identity_middle
    from ifp_compile.adapt import structure_scores

    mlp, attn = model.model.layers[2].mlp, model.model.layers[0].self_attn
    hs, os_ = [], []
    hooks = [mlp.down_proj.register_forward_hook(lambda m, i, o: hs.append(i[0])),
             attn.o_proj.register_forward_hook(lambda m, i, o: os_.append(i[0]))]
    with torch.no_grad():
        for ids in calib[:2]:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()

    def griffin(rows):
        a = torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]).double()
        return (a / a.norm(dim=-1, keepdim=True)).square().sum(0)

    torch.testing.assert_close(channel_scores(ep, "activation", calib[:2])[2], griffin(hs).sqrt())
    cfg = model.config
    head_dim, per_group = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    expected = griffin(os_).reshape(cfg.num_key_value_heads, per_group * head_dim).sum(1).sqrt()
    got = structure_scores(ep, ifp.find_attention_blocks(ep), "activation", calib[:2])[0]
    torch.testing.assert_close(got, expected)
    with pytest.raises(IFPError, match="activation importance needs calibration data"):
        channel_scores(ep, "activation")


def test_masks_for_sparsity_keep_the_top_channels():
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([1.0, 2.0])]
    m = masks_for_sparsity(scores, [0.5, 0.99])
    assert m[0].tolist() == [0.0, 1.0, 1.0, 0.0] and m[1].tolist() == [0.0, 1.0]  # at least one kept


@pytest.mark.parametrize("method", ["magnitude", "taylor", "activation"])
def test_adaptive_masks_prune_the_identity_layer_most(identity_middle, method):
    _, ep, calib = identity_middle
    masks, history = adaptive_masks(ep, calib, 0.5, steps=4, method=method)
    kept = [int(m.sum()) for m in masks]
    assert len(history) == 4 and kept[1] == min(kept) and kept[1] < 32 < max(kept)
    assert sum(kept) == pytest.approx(0.5 * 3 * 64, abs=3)  # importances are centred: mean sparsity = target
    small = ifp.specialize(ep, mask=masks)  # static pruning = specialisation with a fixed mask
    block = ifp.find_ffn_blocks(ep)[0]
    assert ifp.count_parameters(small) == ifp.count_parameters(ep) - block.params_per_channel() * (3 * 64 - sum(kept))
    x = calib[0]
    with torch.no_grad():
        torch.testing.assert_close(small.module()(x), ifp.insert_masks(ep).module()(x, masks), rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_named(identity_middle):
    _, ep, calib = identity_middle
    with pytest.raises(IFPError, match="target sparsity must be in \\(0, 1\\), got 1.5"):
        adaptive_masks(ep, calib, 1.5)
    with pytest.raises(IFPError, match="needs calibration data"):
        adaptive_masks(ep, [], 0.5)
    with pytest.raises(IFPError, match="method must be one of magnitude, taylor, activation, got 'l2'"):
        channel_scores(ep, "l2")


def test_adaptive_counts_give_an_instruction_predictor_non_uniform_budgets(identity_middle):
    from ifp_compile.adapt import adaptive_counts
    from ifp_compile.predictors import IFPredictor
    from ifp_compile.predictors.if_predictor import LMEncoder

    model, ep, calib = identity_middle
    counts = adaptive_counts(ep, calib, 0.5, steps=3)
    assert sum(counts) == 96 and counts[1] == min(counts) < 32 < max(counts)  # the identity layer keeps least
    pred = IFPredictor(LMEncoder(model, num_layers=1), [64] * 3, counts)
    masks = pred(calib[0])
    assert [int((m != 0).sum()) for m in masks] == counts
    with pytest.raises(IFPError, match=r"keep must be in \(0, 1\), got 1.0"):
        adaptive_counts(ep, calib, 1.0)
