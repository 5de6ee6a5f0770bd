"""StaticScales: one fixed channel set per FFN block, with a learned scale per kept channel.

The equal-budget control that separates the two things a trained IFPredictor's masks do:
*choosing* channels and *rescaling* the kept ones (its soft masks carry ``lambda``, which
``specialize`` folds into ``W_down``: a small fine-tune). Here the channel set is the static
calibrated one (GRIFFIN's rule over calibration text, :meth:`init_from_scores`) and never
changes; only the scales train. If a trained predictor beats the static mask but not this
row, its gain came from the scales, not from choosing channels per input or task.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IFPError
from .base import MaskPredictor, keep_counts


class StaticScales(MaskPredictor):
    """``forward(ids)`` -> the same masks for every input: ``kept * scale`` per block."""

    def __init__(self, widths: list[int], keep=0.5):
        super().__init__()
        self.widths = [int(w) for w in widths]
        self.counts = keep_counts(self.widths, keep)
        self.vocab_size = None  # reads no tokens
        total = sum(self.widths)
        # ``kept`` is a Parameter (not a buffer) so it is saved and loaded with the trained
        # part in predictor.safetensors; it never trains (requires_grad False).
        self.kept = nn.Parameter(torch.zeros(total), requires_grad=False)
        # the trained part, named ``head`` like IFPredictor's so the trainer treats both alike
        self.head = nn.Module()
        self.head.scale = nn.Parameter(torch.ones(total))
        offsets = [0]
        for w in self.widths:
            offsets.append(offsets[-1] + w)
        self.offsets = offsets

    def config(self) -> dict:
        return {"kind": "scales", "widths": self.widths, "counts": self.counts}

    @torch.no_grad()
    def init_from_scores(self, scores: list[torch.Tensor], scale: float = 1.0) -> None:
        """The channel set = each block's top-``count`` of ``scores``; every scale starts at 1."""
        if len(scores) != len(self.widths):
            raise IFPError(f"init_from_scores: {len(scores)} score rows for {len(self.widths)} FFN blocks")
        self.kept.zero_()
        for i, (s, w, k) in enumerate(zip(scores, self.widths, self.counts)):
            s = torch.as_tensor(s, dtype=torch.float32).flatten()
            if s.numel() != w:
                raise IFPError(f"init_from_scores: block {i} has {s.numel()} scores for width {w}")
            self.kept[self.offsets[i] + torch.topk(s, k).indices] = 1.0
        self.head.scale.fill_(1.0)

    def masks(self) -> list[torch.Tensor]:
        m = self.kept * self.head.scale
        return [m[self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.widths))]

    def batch_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [m.expand(input_ids.shape[0], -1) for m in self.masks()]

    def forward(self, instruction_ids: torch.Tensor) -> list[torch.Tensor]:
        return self.masks()
