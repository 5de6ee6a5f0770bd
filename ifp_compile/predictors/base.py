"""The mask-predictor interface.

A predictor is an ``nn.Module`` mapping ``instruction_ids`` (LongTensor ``[1, T]``) to a
list of 1-D float masks, one per FFN block in execution order. ``insert_masks``
inlines its graph as a branch of the program; ``specialize`` evaluates only that branch.
Nothing else is required, so the trained IFPruning predictor (soft masks
``lambda * TopK(lambda)``) drops in beside the training-free one.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskPredictor(nn.Module):
    """Base class: subclasses set ``widths`` and implement ``forward``."""

    #: FFN width of each block the predictor emits a mask for
    widths: list[int]

    def forward(self, instruction_ids: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def example_instruction(self) -> torch.Tensor:
        """Token ids used to trace the predictor (their values do not matter)."""
        return torch.zeros(1, 8, dtype=torch.long)


def keep_counts(widths: list[int], keep) -> list[int]:
    """Per-block channel counts from a keep ratio in (0, 1] or explicit counts."""
    from ..errors import IFPError

    if isinstance(keep, (int, float)) and not isinstance(keep, bool):
        if not 0.0 < float(keep) <= 1.0:
            raise IFPError(f"keep must be a ratio in (0, 1], got {keep}")
        return [max(1, round(float(keep) * w)) for w in widths]
    counts = list(keep)
    if len(counts) != len(widths):
        raise IFPError(f"keep has {len(counts)} counts but the model has {len(widths)} FFN blocks")
    for i, (k, w) in enumerate(zip(counts, widths)):
        if not isinstance(k, int) or not 0 <= k <= w:
            raise IFPError(f"keep count for FFN block {i} must be an int in [0, {w}], got {k!r}")
    return counts
