"""Layer importance: how much each decoder layer changes the residual stream.

Adapt-Pruner's measure: the cosine similarity between a layer's input and output hidden
states, averaged over calibration tokens. A layer that changes its input more (lower
cosine) is more important. Raw scores ``1 - cos`` are centred to mean 0 and divided by
their largest absolute value, into [-1, 1]; an all-equal set of layers gets all zeros.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.export import ExportedProgram

from ..errors import IFPError
from ..passes.layer_probe import layer_probe


def layer_cosines(ep: ExportedProgram, calibration: Iterable[torch.Tensor], *, eps: float = 1e-8) -> list[float]:
    """Mean over calibration tokens of cos(layer input, layer output), one per decoder layer.

    ``calibration`` yields model inputs: token ids ``[1, T]`` for a language model, or a
    tuple of the program's inputs (``(ids, masks)`` for a masked program).
    """
    probe, bounds = layer_probe(ep)
    sums = torch.zeros(len(bounds), dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for ids in calibration:
            outs = probe(*ids) if isinstance(ids, tuple) else probe(ids)
            for i in range(len(bounds)):
                x, y = outs[2 * i].flatten(0, -2).double(), outs[2 * i + 1].flatten(0, -2).double()
                cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(eps)
                sums[i] += cos.sum()
            tokens += outs[0].flatten(0, -2).shape[0]
    if tokens == 0:
        raise IFPError("layer importance needs calibration data: none was given")
    return (sums / tokens).tolist()


def normalise_importance(cosines: list[float]) -> list[float]:
    """``1 - cos``, centred to mean 0 and scaled by the largest absolute value into [-1, 1]."""
    raw = torch.tensor([1.0 - c for c in cosines], dtype=torch.float64)
    centred = raw - raw.mean()
    top = centred.abs().max()
    if top <= 1e-12:
        return [0.0] * len(cosines)
    return (centred / top).tolist()


def layer_importance(ep: ExportedProgram, calibration: Iterable[torch.Tensor]) -> list[float]:
    """Adapt-Pruner's per-layer importance in [-1, 1] (higher = keep more)."""
    return normalise_importance(layer_cosines(ep, calibration))
