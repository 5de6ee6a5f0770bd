"""Paired bootstrap intervals: checked against cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from ifp_compile.errors import IFPError
from ifp_compile.evaluation.bootstrap import paired_bootstrap


def test_a_constant_difference_has_no_width():
    a = np.linspace(1.0, 3.0, 50)
    iv = paired_bootstrap(a, a - 0.25)
    assert iv.mean == pytest.approx(0.25) and iv.low == pytest.approx(0.25) and iv.high == pytest.approx(0.25)
    assert iv.excludes_zero and iv.n == 50


def test_pairing_removes_what_both_rows_share():
    """Segments differ a lot (shared), the rows by a little (paired): the interval sees the
    small difference; unpaired, the segment spread would swamp it."""
    rng = np.random.default_rng(1)
    hardness = rng.normal(0, 2.0, 200)
    a = hardness + 0.1 + rng.normal(0, 0.05, 200)
    b = hardness
    iv = paired_bootstrap(a, b)
    assert iv.excludes_zero and 0.08 < iv.low < iv.mean < iv.high < 0.12


def test_width_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    d = rng.normal(0.0, 1.0, 400)
    iv = paired_bootstrap(d, np.zeros_like(d))
    half = 1.96 * d.std(ddof=1) / np.sqrt(d.size)
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.1)
    assert iv.low < d.mean() < iv.high


def test_seeded_and_refuses_unpaired_input():
    a, b = np.arange(10.0), np.arange(10.0)[::-1]
    assert paired_bootstrap(a, b) == paired_bootstrap(a, b)
    with pytest.raises(IFPError, match="same items"):
        paired_bootstrap(a, b[:9])
    with pytest.raises(IFPError, match="at least 2"):
        paired_bootstrap([1.0], [2.0])
