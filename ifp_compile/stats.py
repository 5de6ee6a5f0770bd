"""Parameter accounting: what a program holds and what a mask keeps."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.export import ExportedProgram

from .blocks import AttentionBlock, FFNBlock


def count_parameters(ep: ExportedProgram) -> int:
    """Scalars in the program's parameters, each distinct tensor counted once (tied weights once)."""
    seen: set[int] = set()
    total = 0
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name != "PARAMETER":
            continue
        t = ep.state_dict[spec.target]
        key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def kept_parameters(ep: ExportedProgram, blocks: Sequence[FFNBlock | AttentionBlock],
                    masks: Sequence[torch.Tensor]) -> int:
    """Parameter count of ``specialize(ep, mask=masks)`` computed from the masks alone.

    Each dropped channel removes ``block.params_per_channel()`` scalars; a block whose
    weights are shared keeps the original and adds a private sliced copy. ``blocks`` may
    mix FFN and attention blocks (a head mask's "channel" is a key/value head group).
    """
    total = count_parameters(ep)
    for b, m in zip(blocks, masks):
        k = int((m != 0).sum())
        per = b.params_per_channel()
        shared_per = sum(p.params_per_channel() for p in b.params if p.key in b.shared_params)
        total -= (b.width - k) * (per - shared_per)
        total += k * shared_per
    return total


def count_flops(module, *args) -> int:
    """FLOPs of one forward of ``module(*args)``, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()
