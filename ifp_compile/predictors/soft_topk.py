"""SoftTopK: the differentiable top-k of IFPruning (CoDA / CoLT5 style).

For a score row ``z`` (one FFN block's channel scores) and a keep count ``k``:

    lambda_i = sigmoid((z_i - t) / tau),   t such that sum_i lambda_i = k
    mask     = lambda * TopK(lambda, k)

``t`` is found by bisection (``iterations`` halvings of an interval that provably
contains it), then ``lambda`` is rescaled by ``k / sum(lambda)`` so the sum holds to
float rounding whatever the iteration count. The mask has exactly ``k`` non-zero
entries: the top-k ``lambda`` are the largest, each ``<= 1``, and they must sum to
more than ``k - 1`` unless all are positive.

Why a sigmoid with a bisected threshold rather than CoDA's optimal-transport
iterations: it has the same fixed point structure (a soft top-k whose values sum to
``k``), one temperature instead of an annealed epsilon schedule, and an exact
gradient by implicit differentiation of ``sum(sigmoid((z - t) / tau)) = k``:

    dt/dz_j = w_j / sum_i w_i,   w = sigmoid'((z - t) / tau)

(bisection steps are comparisons, so autograd alone would treat ``t`` as a constant
and break the sum constraint to first order). ``t`` is therefore rebuilt as
``t* + sum(w * (z - z.detach())) / sum(w)``: value ``t*``, gradient ``w / sum(w)``.

Everything is plain tensor ops with a fixed iteration count, so a predictor using
SoftTopK exports with ``torch.export`` and becomes a branch of the masked program.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IFPError

#: Default bisection steps: the threshold interval shrinks by 2**-30 of the score range.
ITERATIONS = 30
#: Default temperature, in units of the scores (the MLP head that produces them learns
#: their scale, so a fixed 1.0 lets training sharpen or soften the masks itself).
TEMPERATURE = 1.0


class SoftTopK(nn.Module):
    """Differentiable top-k over the last dimension.

    ``k`` is an int (same for every row) or a sequence with one count per row: the
    input is then ``[..., len(k), width]`` (a batch of score matrices). ``forward(z)`` returns ``lambda * TopK(lambda, k)``: same shape as ``z``,
    exactly ``k`` non-zero entries per row, ``sum(lambda) == k`` before the cut, and
    gradients that flow to ``z``. ``k == width`` gives all ones (nothing to choose).

    The exact gradient of ``lambda * TopK(lambda, k)`` is zero for every channel the cut
    drops, so a channel outside the current top-k can never earn its way back in: the
    first selection reinforces itself (a planted-structure test shows training stalls at
    the initial choice). ``straight_through=True`` keeps the forward value and
    differentiates as if the cut were not there (the straight-through estimator), which
    lets training swap channels. It applies only when ``z`` requires grad.
    """

    def __init__(self, k, *, temperature: float = TEMPERATURE, iterations: int = ITERATIONS,
                 straight_through: bool = False):
        super().__init__()
        counts = [k] if isinstance(k, int) else list(k)
        if not counts or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in counts):
            raise IFPError(f"SoftTopK: k must be a positive int or a list of them, got {k!r}")
        if not temperature > 0:
            raise IFPError(f"SoftTopK: temperature must be > 0, got {temperature}")
        if not isinstance(iterations, int) or iterations < 1:
            raise IFPError(f"SoftTopK: iterations must be a positive int, got {iterations!r}")
        self.k = k if isinstance(k, int) else counts
        self.temperature = float(temperature)
        self.iterations = iterations
        self.straight_through = bool(straight_through)

    def extra_repr(self) -> str:
        return (f"k={self.k}, temperature={self.temperature}, iterations={self.iterations}, "
                f"straight_through={self.straight_through}")

    def _counts(self, z: torch.Tensor) -> list[int]:
        width = z.shape[-1]
        if isinstance(self.k, int):
            counts = [self.k]
        else:
            if z.dim() < 2 or z.shape[-2] != len(self.k):
                raise IFPError(f"SoftTopK with {len(self.k)} per-row counts needs a [..., {len(self.k)}, width] "
                               f"input, got shape {tuple(z.shape)}")
            counts = self.k
        too_big = [c for c in counts if c > width]
        if too_big:
            raise IFPError(f"SoftTopK: k={too_big[0]} is larger than the width {width}")
        return counts

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        counts = self._counts(z)
        width = z.shape[-1]
        if all(c == width for c in counts):
            return torch.ones_like(z) + 0 * z  # keeps z in the autograd graph
        if isinstance(self.k, int):
            k = torch.full(z.shape[:-1] + (1,), float(self.k), dtype=z.dtype, device=z.device)
        else:
            k = torch.tensor(counts, dtype=z.dtype, device=z.device).unsqueeze(-1)
        lam = soft_topk_weights(z, k, self.temperature, self.iterations)
        kmax = max(counts)
        # lambda is monotone in z, so TopK(lambda) = TopK(z); selecting on z avoids ties that
        # only exist after rounding (tiny score scales) and keeps the choice exact
        idx = torch.topk(z.detach(), kmax, dim=-1).indices
        if isinstance(self.k, int):
            keep = torch.zeros_like(lam).scatter(-1, idx, 1.0)
        else:  # rows keep different counts: the first k_r of the top-kmax
            rank_ok = (torch.arange(kmax, device=z.device) < k).to(z.dtype)
            keep = torch.zeros_like(lam).scatter(-1, idx, rank_ok.expand_as(idx))
        out = lam * keep
        if self.straight_through and z.requires_grad:
            # forward unchanged (the added term is exactly 0); backward as if nothing were
            # cut, so a dropped channel that would help still gets its gradient
            out = out + (lam - lam.detach()) * (1 - keep)
        return out


def soft_topk_weights(z: torch.Tensor, k: torch.Tensor, temperature: float, iterations: int) -> torch.Tensor:
    """``lambda = sigmoid((z - t) / tau)`` with ``sum(lambda) = k`` per row (``k``: [..., 1]).

    Rows with ``k == width`` come out as all ones.
    """
    zd = z.detach()
    # sigmoid(x) < 1e-12 for x < -28: beyond these bounds the sum is ~0 or ~width
    margin = 30.0 * temperature
    lo = zd.amin(-1, keepdim=True) - margin  # sum(lambda(lo)) ~ width >= k
    hi = zd.amax(-1, keepdim=True) + margin  # sum(lambda(hi)) ~ 0 <= k
    for _ in range(iterations):
        mid = (lo + hi) / 2
        above = torch.sigmoid((zd - mid) / temperature).sum(-1, keepdim=True) > k
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    t_star = (lo + hi) / 2
    s = torch.sigmoid((zd - t_star) / temperature)
    w = s * (1 - s)
    wsum = w.sum(-1, keepdim=True)
    # implicit gradient of the threshold (see the module docstring); a saturated row
    # (wsum == 0) has no gradient, which is exact
    t = t_star + (w * (z - zd)).sum(-1, keepdim=True) / wsum.clamp_min(torch.finfo(z.dtype).tiny)
    lam = torch.sigmoid((z - t) / temperature)
    total = lam.sum(-1, keepdim=True)
    # exact sum; at full width the sigmoid cannot reach 1, so those rows are set to 1
    full = k >= z.shape[-1]
    return torch.where(full, torch.ones_like(lam), lam * (k / total.clamp_min(torch.finfo(z.dtype).tiny)))
