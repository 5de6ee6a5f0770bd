"""Capture a model as a ``torch.export`` program.

Why a wrapper: a Hugging Face causal LM returns a ``ModelOutput`` with a KV cache;
the compiler wants a pure function ``input_ids -> logits`` so that every pass sees
one tensor output and no cache state. Plain ``nn.Module`` s are exported as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ProgramError
from .progress import status


class CausalLMLogits(nn.Module):
    """``input_ids -> logits`` view of a Hugging Face causal LM (cache off).

    The wrapped model is stored as ``lm``, so parameter names in the exported
    program read ``lm.model.layers.0.mlp.down_proj.weight``.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a ``transformers`` model with a causal-LM head (duck-typed: no import)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return False
    return hasattr(model, "generation_config") and model.get_output_embeddings() is not None


def seq_dynamic_shapes(example_args: tuple, *, max_len: int | None = None) -> tuple:
    """``dynamic_shapes`` marking dim 1 (sequence) of the first argument as dynamic."""
    seq = torch.export.Dim("seq", min=2, max=max_len or 4096)
    return ({1: seq},) + (None,) * (len(example_args) - 1)


def export(
    model: nn.Module,
    example_args: tuple[Any, ...],
    dynamic_shapes: Any = None,
    *,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Export ``model`` with ``torch.export`` in eval mode.

    Hugging Face causal LMs are wrapped by :class:`CausalLMLogits` (logits only, no KV
    cache). ``dynamic_shapes`` is passed to ``torch.export.export`` unchanged; the
    string ``"seq"`` is a shortcut for a dynamic sequence dimension on the first input.
    """
    if not isinstance(model, nn.Module):
        raise ProgramError(f"export() takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_args, tuple):
        raise ProgramError(
            "export(): example_args must be a tuple of example inputs, e.g. (input_ids,); "
            f"got {type(example_args).__name__}"
        )
    target = CausalLMLogits(model) if is_hf_causal_lm(model) else model
    if dynamic_shapes == "seq":
        dynamic_shapes = seq_dynamic_shapes(example_args)
    was_training = model.training
    model.eval()
    try:
        with status(f"exporting {type(model).__name__} with torch.export"), torch.no_grad():
            return torch.export.export(
                target, example_args, dynamic_shapes=dynamic_shapes, strict=strict
            )
    finally:
        model.train(was_training)
