"""The per-layer sparsity update of Adapt-Pruner.

At every pruning step ``t`` each layer's sparsity (fraction of its *original* width
removed) moves by the same increment, less for important layers:

    s_l(t + 1) = clip(s_l(t) + delta - A * I_l, 0, 0.99),   delta = target / steps

``I_l`` in [-1, 1] is the layer's importance (re-measured at every step in the paper);
``A`` is the amplitude (the paper's default 0.03).
"""

from __future__ import annotations

from ..errors import IFPError

AMPLITUDE = 0.03
MAX_SPARSITY = 0.99


def update_sparsity(sparsity: list[float], importance: list[float], *, target: float, steps: int,
                    amplitude: float = AMPLITUDE) -> list[float]:
    """One step of the update for every layer."""
    if not 0.0 < target < 1.0:
        raise IFPError(f"target sparsity must be in (0, 1), got {target}")
    if not isinstance(steps, int) or steps < 1:
        raise IFPError(f"steps must be a positive int, got {steps!r}")
    if len(sparsity) != len(importance):
        raise IFPError(f"{len(sparsity)} layer sparsities but {len(importance)} importances")
    bad = [i for i, v in enumerate(importance) if not -1.0 <= v <= 1.0]
    if bad:
        raise IFPError(f"importance of layer {bad[0]} is {importance[bad[0]]}, outside [-1, 1]")
    delta = target / steps
    return [min(max(s + delta - amplitude * imp, 0.0), MAX_SPARSITY) for s, imp in zip(sparsity, importance)]


def sparsity_schedule(importances: list[list[float]], *, target: float, amplitude: float = AMPLITUDE) -> list[list[float]]:
    """Per-layer sparsity after each of ``len(importances)`` steps, from zero."""
    steps = len(importances)
    s = [0.0] * len(importances[0]) if importances else []
    out = []
    for imp in importances:
        s = update_sparsity(s, imp, target=target, steps=steps, amplitude=amplitude)
        out.append(s)
    return out
