"""Validation of concrete masks and instructions, shared by the passes and the CLI.

Masks are checked *before* any program is touched, so a bad mask never leaves a
half-specialised program behind, and every message names the block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .blocks import AttentionBlock, FFNBlock
from .errors import InstructionError, MaskError


def validate_masks(masks, blocks: Sequence[FFNBlock | AttentionBlock], *, what: str = "FFN block",
                   argument: str = "mask") -> list[torch.Tensor]:
    """Check ``masks`` against ``blocks`` and return them as 1-D float32 CPU tensors.

    Masks of any floating dtype (or bool) on any device are accepted; float64 values are
    rounded to float32 here, which is the precision every pass folds them with.

    ``what`` names the blocks in messages ("FFN block", "attention block"); an attention
    block's mask has one value per key/value head.
    """
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
        raise MaskError(
            f"{argument} must be a list with one 1-D tensor per {what} ({len(blocks)} blocks), "
            f"got {type(masks).__name__}"
        )
    if len(masks) != len(blocks):
        raise MaskError(f"got {len(masks)} masks for {len(blocks)} {what}s" + ("" if argument == "mask" else f" ({argument})"))
    out = []
    for b, m in zip(blocks, masks):
        where = f"{argument} for {what} {b.index} ({b.name})"
        if not isinstance(m, torch.Tensor):
            raise MaskError(f"{where} must be a torch.Tensor, got {type(m).__name__}")
        if m.dim() != 1 or m.shape[0] != b.width:
            raise MaskError(f"{where} has shape {tuple(m.shape)}, expected ({b.width},)")
        if m.dtype == torch.bool:
            m = m.float()
        elif not m.dtype.is_floating_point:
            raise MaskError(f"{where} has dtype {m.dtype}; masks are floating point (or bool)")
        if m.device.type == "meta":
            raise MaskError(f"{where} is on the meta device: it has a shape but no values")
        # any float dtype and device: the values are read once, as float32 on the CPU (a
        # float32 mask is what the masked program's inputs take and what is folded)
        m = m.detach().to("cpu", torch.float32)
        bad = ~torch.isfinite(m)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise MaskError(f"{where} has a non-finite value {m[i].item()} at channel {i}")
        if (m < 0).any():
            i = int((m < 0).nonzero()[0])
            raise MaskError(f"{where} has a negative value {m[i].item()} at channel {i}")
        out.append(m)
    return out


def instruction_ids(instruction, tokenizer) -> torch.Tensor:
    """Token ids ``[1, T]`` for an instruction given as text (with a tokenizer) or ids."""
    if isinstance(instruction, torch.Tensor):
        ids = instruction if instruction.dim() == 2 else instruction.reshape(1, -1)
        if ids.dtype not in (torch.int64, torch.int32) or ids.shape[0] != 1:
            raise InstructionError(
                f"instruction ids must be an integer tensor of shape [1, T], got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.shape[1] == 0:
            raise InstructionError("instruction ids are empty")
        return ids.long()
    if not isinstance(instruction, str):
        raise InstructionError(f"instruction must be a string or token ids, got {type(instruction).__name__}")
    if not instruction.strip():
        raise InstructionError("instruction is empty")
    if tokenizer is None:
        raise InstructionError("a text instruction needs tokenizer= (or pass token ids)")
    ids = tokenizer(instruction, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise InstructionError(f"the tokenizer produced no tokens for instruction {instruction!r}")
    return ids.reshape(1, -1).long()
