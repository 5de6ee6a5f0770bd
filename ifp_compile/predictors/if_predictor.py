"""IFPredictor: the trained sparse mask predictor of IFPruning.

    instruction ids --encoder LM--> last non-padding token's final hidden state h
    h --Linear(d, 128)--GELU--Linear(128, sum of FFN widths)--> scores, one row per block
    each row --SoftTopK(k_l)--> mask_l = lambda * TopK(lambda, k_l)

The masks are soft (kept channels carry ``lambda``); specialisation folds them into the
kept columns of ``W_down``, so the small dense model reproduces the masked one exactly.

The encoder is any causal LM. :class:`LMEncoder` wraps a Hugging Face model, and with
``num_layers=n`` uses only the embedding and first ``n`` decoder layers of the *target*
model itself, sharing its parameters (no copy): cheap, and the program exported with
this predictor holds each shared weight once.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from ..errors import IFPError
from .base import MaskPredictor, keep_counts
from .soft_topk import ITERATIONS, TEMPERATURE, SoftTopK

MLP_HIDDEN = 128


def _decoder_layers(base: nn.Module) -> tuple[str, nn.ModuleList]:
    """The base model's list of decoder layers (the longest direct ModuleList child)."""
    lists = [(name, m) for name, m in base.named_children() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise IFPError(f"{type(base).__name__} has no list of decoder layers to truncate")
    return max(lists, key=lambda nm: len(nm[1]))


class LMEncoder(nn.Module):
    """``(input_ids, attention_mask) -> final hidden states [B, T, d]`` of a HF causal LM.

    ``num_layers=n`` keeps only the first ``n`` decoder layers (then the model's final
    norm), sharing every parameter with ``model``.
    """

    def __init__(self, model: nn.Module, num_layers: int | None = None):
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "base_model"):
            raise IFPError(f"LMEncoder needs a Hugging Face causal LM, got {type(model).__name__}")
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        if num_layers is not None:
            name, layers = _decoder_layers(base)
            if not isinstance(num_layers, int) or not 1 <= num_layers <= len(layers):
                raise IFPError(f"LMEncoder: num_layers must be in [1, {len(layers)}], got {num_layers!r}")
            # a shallow copy whose layer list is a prefix: same parameter objects
            truncated = copy.copy(base)
            truncated._modules = dict(base._modules)
            truncated._modules[name] = nn.ModuleList(list(layers)[:num_layers])
            base = truncated
        self.base = base
        self.num_layers = num_layers
        self.vocab_size = int(config.vocab_size)
        self.hidden_size = int(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state


class IFPredictor(MaskPredictor):
    """Instruction -> one soft top-k mask per FFN block (see the module docstring).

    ``encoder`` maps ``(input_ids, attention_mask)`` to hidden states ``[B, T, d]`` and
    has ``hidden_size`` (and ideally ``vocab_size``) attributes, like :class:`LMEncoder`.
    ``widths`` are the FFN widths in block order (``[b.width for b in
    find_ffn_blocks(ep)]``); ``keep`` is a ratio in (0, 1] or one count per block.
    """

    def __init__(self, encoder: nn.Module, widths: list[int], keep=0.5, *, mlp_hidden: int = MLP_HIDDEN,
                 temperature: float = TEMPERATURE, iterations: int = ITERATIONS, straight_through: bool = True):
        super().__init__()
        if not widths:
            raise IFPError("IFPredictor needs at least one FFN width")
        hidden = getattr(encoder, "hidden_size", None)
        if not isinstance(hidden, int):
            raise IFPError(f"IFPredictor: the encoder {type(encoder).__name__} must have an int hidden_size")
        self.widths = [int(w) for w in widths]
        self.counts = keep_counts(self.widths, keep)
        bad = [(i, k) for i, k in enumerate(self.counts) if k < 1]
        if bad:
            raise IFPError(f"IFPredictor: keep count for FFN block {bad[0][0]} is {bad[0][1]}; every block keeps >= 1")
        self.encoder = encoder
        self.vocab_size = getattr(encoder, "vocab_size", None)
        self.head = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, sum(self.widths)))
        # blocks with one width are scored as one batch: [B, n_blocks, width]
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(self.widths):
            groups[w].append(i)
        self.groups = [(w, idx) for w, idx in sorted(groups.items())]
        self.topk = nn.ModuleList(SoftTopK([self.counts[i] for i in idx], temperature=temperature,
                                           iterations=iterations, straight_through=straight_through)
                                  for _, idx in self.groups)
        offsets = [0]
        for w in self.widths:
            offsets.append(offsets[-1] + w)
        self.offsets = offsets

    def config(self) -> dict:
        """What is needed to rebuild this predictor around the same encoder (JSON-able)."""
        t = self.topk[0]
        return {"widths": self.widths, "counts": self.counts, "mlp_hidden": self.head[0].out_features,
                "temperature": t.temperature, "iterations": t.iterations, "straight_through": t.straight_through}

    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Refuse ids the encoder's vocabulary does not have (a tokenizer mismatch)."""
        from torch._subclasses.fake_tensor import is_fake

        if self.vocab_size is None or input_ids.numel() == 0 or is_fake(input_ids):  # fake: a shape check
            return
        top, low = int(input_ids.max()), int(input_ids.min())
        if top >= self.vocab_size or low < 0:
            bad = top if top >= self.vocab_size else low
            raise IFPError(f"instruction token id {bad} is outside the predictor encoder's vocabulary "
                           f"(size {self.vocab_size}): was the instruction tokenized with another tokenizer?")

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Channel scores ``[B, sum(widths)]`` from the last non-padding token."""
        if not torch.compiler.is_compiling():
            self.check_ids(input_ids)
        hidden = self.encoder(input_ids, attention_mask)
        if attention_mask is None:
            last = hidden[:, -1]
        else:  # the last real token, with left or right padding
            steps = torch.arange(1, attention_mask.shape[1] + 1, device=hidden.device)
            pos = (attention_mask.long() * steps).argmax(1)
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]
        # the head and SoftTopK run in float32 whatever the encoder's dtype: they are small,
        # and top-k selection over scores rounded to bf16 would tie many channels
        return self.head(last.to(self.head[0].weight.dtype))

    def batch_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One ``[B, width]`` mask per FFN block for a (right-padded) batch of instructions."""
        z = self.scores(input_ids, attention_mask)
        masks: list[torch.Tensor | None] = [None] * len(self.widths)
        for (w, idx), topk in zip(self.groups, self.topk):
            rows = torch.stack([z[:, self.offsets[i]:self.offsets[i] + w] for i in idx], dim=1)
            out = topk(rows)
            for j, i in enumerate(idx):
                masks[i] = out[:, j]
        return masks

    def forward(self, instruction_ids: torch.Tensor) -> list[torch.Tensor]:
        return [m[0] for m in self.batch_masks(instruction_ids)]

    @torch.no_grad()
    def init_from_scores(self, scores: list[torch.Tensor], scale: float = 4.0) -> None:
        """Start from a static mask: the head's output bias becomes ``scores`` (one row per
        block, standardised and multiplied by ``scale``) and its last weights shrink, so
        the first masks are that mask's top-k and training improves from there.
        """
        if len(scores) != len(self.widths):
            raise IFPError(f"init_from_scores: {len(scores)} score rows for {len(self.widths)} FFN blocks")
        rows = []
        for i, (s, w) in enumerate(zip(scores, self.widths)):
            s = torch.as_tensor(s, dtype=torch.float32).flatten()
            if s.numel() != w:
                raise IFPError(f"init_from_scores: block {i} has {s.numel()} scores for width {w}")
            rows.append((s - s.mean()) / s.std().clamp_min(1e-12) * scale)
        last = self.head[2]
        last.bias.copy_(torch.cat(rows))
        last.weight.mul_(0.01)
