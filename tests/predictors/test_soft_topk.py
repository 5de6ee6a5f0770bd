"""SoftTopK: exact count, the sum constraint, exact gradients, ties, extreme scales."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ifp_compile.errors import IFPError
from ifp_compile.predictors import SoftTopK
from ifp_compile.predictors.soft_topk import soft_topk_weights


@st.composite
def scores(draw):
    rows = draw(st.integers(1, 4))
    width = draw(st.integers(2, 40))
    k = draw(st.integers(1, width))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**16))
    z = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale
    return z, k


@given(scores())
def test_exactly_k_nonzero_and_lambda_sums_to_k(case):
    z, k = case
    m = SoftTopK(k)(z)
    assert m.shape == z.shape and torch.isfinite(m).all()
    assert ((m != 0).sum(-1) == k).all()
    lam = soft_topk_weights(z, torch.full((z.shape[0], 1), float(k)), 1.0, 30)
    torch.testing.assert_close(lam.sum(-1), torch.full((z.shape[0],), float(k)), rtol=1e-5, atol=1e-5)
    assert (m >= 0).all()
    # the kept entries are the k largest scores (up to ties in lambda)
    kept_min = torch.where(m > 0, z, torch.inf).amin(-1)
    dropped_max = torch.where(m > 0, -torch.inf, z).amax(-1)
    assert (kept_min >= dropped_max - 1e-6 * z.abs().amax()).all() or k == z.shape[-1]


def test_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 12, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, 12, generator=g, dtype=torch.float64)
    # 60 halvings: the bisected threshold is exact in float64, so finite differences see
    # the same function the implicit gradient differentiates
    top = SoftTopK(4, iterations=60)
    assert torch.autograd.gradcheck(lambda z: (top(z) * w).sum(), (z,), eps=1e-6, atol=1e-5)


def test_gradients_flow_and_preserve_the_sum():
    z = torch.randn(2, 10, requires_grad=True)
    lam = soft_topk_weights(z, torch.full((2, 1), 3.0), 1.0, 30)
    (lam * torch.arange(10.0)).sum().backward()
    assert z.grad.abs().sum() > 0
    # d(sum lambda)/dz = 0: moving along the gradient of the sum changes nothing
    z2 = z.detach().requires_grad_()
    soft_topk_weights(z2, torch.full((2, 1), 3.0), 1.0, 30).sum().backward()
    assert z2.grad.abs().max() < 1e-5


def test_ties_are_stable():
    z = torch.zeros(2, 10)
    m1, m2 = SoftTopK(4)(z), SoftTopK(4)(z)
    assert torch.equal(m1, m2) and ((m1 != 0).sum(-1) == 4).all()
    torch.testing.assert_close(m1[m1 != 0], torch.full((8,), 0.4))
    z = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]], requires_grad=True)  # a tie across the cut
    m = SoftTopK(2)(z)
    assert (m != 0).sum() == 2 and m[0, 0] > m[0, 1:].max()
    m.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_k_one_and_k_width():
    z = torch.randn(3, 7, requires_grad=True)
    one = SoftTopK(1)(z)
    assert ((one != 0).sum(-1) == 1).all() and torch.equal(one.argmax(-1), z.argmax(-1))
    full = SoftTopK(7)(z)
    assert torch.equal(full, torch.ones(3, 7))
    full.sum().backward()
    assert torch.equal(z.grad, torch.zeros(3, 7))  # nothing to choose: no gradient


def test_saturated_scores_give_hard_masks_without_nans():
    z = torch.tensor([[1e6, -1e6, 5e5, 0.0, -3e5]], requires_grad=True)
    m = SoftTopK(2)(z)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]]))
    m.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_per_row_counts_and_batches():
    z = torch.randn(5, 3, 16)  # a batch of 5 score matrices, rows keep 1, 4 and 16
    m = SoftTopK([1, 4, 16])(z)
    assert ((m != 0).sum(-1) == torch.tensor([1, 4, 16])).all()


def test_exports_as_a_graph():
    ep = torch.export.export(SoftTopK(3), (torch.randn(2, 16),))
    z = torch.randn(2, 16)
    torch.testing.assert_close(ep.module()(z), SoftTopK(3)(z))


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "positive int"),
    (dict(k=[2, 0]), "positive int"),
    (dict(k=2, temperature=0.0), "temperature"),
    (dict(k=2, iterations=0), "iterations"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(IFPError, match=message):
        SoftTopK(**kwargs)


def test_k_larger_than_width_is_named():
    with pytest.raises(IFPError, match="k=9 is larger than the width 8"):
        SoftTopK(9)(torch.randn(1, 8))
    with pytest.raises(IFPError, match=r"\[\.\.\., 2, width\]"):
        SoftTopK([1, 2])(torch.randn(3, 8))


def test_straight_through_keeps_the_forward_and_reaches_dropped_channels():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0]], requires_grad=True)
    w = torch.tensor([[0.0, 0.0, 0.0, -1.0]])  # only the dropped channel 3 matters to the loss
    exact, st = SoftTopK(2), SoftTopK(2, straight_through=True)
    assert torch.equal(exact(z), st(z))
    (exact(z) * w).sum().backward()
    assert z.grad[0, 3] == 0  # the cut hides it: it can never be chosen
    z.grad = None
    (st(z) * w).sum().backward()
    assert z.grad[0, 3] < 0  # gradient descent raises its score
    # without grad (export, specialisation) nothing is added to the graph
    with torch.no_grad():
        assert torch.equal(st(z), exact(z))
