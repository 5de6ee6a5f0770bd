"""Static adaptive pruning of FFN channels: Adapt-Pruner's schedule on the compiler's passes.

Static pruning is specialisation with a fixed, non-uniform mask: per-layer sparsities
come from the importance-driven schedule (``schedule.py``), and within a layer the
channels with the lowest importance go, where a channel's importance is summed over
every coupled tensor discovery lists for it (gate and up rows, down column, biases):

- ``"magnitude"``: sum of ``|w|``;
- ``"taylor"``: sum of ``|w * dL/dw|`` (first order), ``L`` the next-token loss on
  calibration data.

Layer importance is re-measured at every step on the program masked so far. Training
between steps (the incremental schedule) is not built yet: with zero training steps the
within-layer ranking does not change, so it is computed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.export import ExportedProgram

from ..errors import IFPError
from ..passes import find_ffn_blocks, insert_masks
from .importance import layer_cosines, normalise_importance
from .schedule import AMPLITUDE, update_sparsity

METHODS = ("magnitude", "taylor")


def _segments(t: torch.Tensor, axis: int, offsets, width: int) -> torch.Tensor:
    """Per-channel sum over everything but the intermediate axis, segments added."""
    moved = t.movedim(axis, 0)
    return sum(moved.narrow(0, o, width).reshape(width, -1).sum(1) for o in offsets)


def _taylor_grads(ep: ExportedProgram, calibration: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    gm = ep.module()
    params = dict(gm.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    for ids in calibration:
        logits = gm(ids)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        for (k, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[k] += g
    return grads


def channel_scores(ep: ExportedProgram, method: str = "magnitude",
                   calibration: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """One importance score per channel per FFN block (higher = keep)."""
    if method not in METHODS:
        raise IFPError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    blocks = find_ffn_blocks(ep)
    state = {**ep.state_dict, **ep.constants}
    grads = None
    if method == "taylor":
        if not calibration:
            raise IFPError("Taylor importance needs calibration data (token ids [1, T])")
        grads = _taylor_grads(ep, calibration)
    scores = []
    with torch.no_grad():
        for b in blocks:
            total = torch.zeros(b.width, dtype=torch.float64)
            for p in b.params:
                w = state[p.key].detach().double()
                if grads is not None:
                    if p.key not in grads:
                        raise IFPError(f"FFN block {b.index} ({b.name}): {p.key} is not a parameter, "
                                       "so it has no gradient for Taylor importance")
                    w = w * grads[p.key].double()
                total += _segments(w.abs(), p.axis, p.offsets, b.width)
            scores.append(total)
    return scores


def masks_for_sparsity(scores: list[torch.Tensor], sparsity: list[float]) -> list[torch.Tensor]:
    """Binary masks keeping the top ``round((1 - s_l) * width)`` channels (at least 1)."""
    masks = []
    for s, sp in zip(scores, sparsity):
        w = s.numel()
        k = min(w, max(1, round((1.0 - sp) * w)))
        masks.append(torch.zeros(w).index_fill(0, torch.topk(s, k).indices, 1.0))
    return masks


def adaptive_masks(ep: ExportedProgram, calibration: Sequence[torch.Tensor], target: float, *, steps: int = 5,
                   amplitude: float = AMPLITUDE, method: str = "magnitude") -> tuple[list[torch.Tensor], list[list[float]]]:
    """Adapt-Pruner's masks for FFN sparsity ``target``; also the sparsities after each step."""
    if not 0.0 < target < 1.0:
        raise IFPError(f"target sparsity must be in (0, 1), got {target}")
    if not calibration:
        raise IFPError("adaptive pruning needs calibration data (token ids [1, T])")
    scores = channel_scores(ep, method, calibration)
    masked = insert_masks(ep)
    sparsity = [0.0] * len(scores)
    masks = masks_for_sparsity(scores, sparsity)
    history = []
    for _ in range(steps):
        importance = normalise_importance(layer_cosines(masked, [(ids, masks) for ids in calibration]))
        sparsity = update_sparsity(sparsity, importance, target=target, steps=steps, amplitude=amplitude)
        masks = masks_for_sparsity(scores, sparsity)
        history.append(sparsity)
    return masks, history
