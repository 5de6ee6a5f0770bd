"""Adapt-Pruner on the compiler's passes: static pruning = specialisation with a fixed,
non-uniform mask over FFN channels and key/value-head groups.

Per step ``t`` of ``steps``:

1. layer importance is measured on the program masked so far (``importance.py``);
2. every layer's sparsity moves by ``delta - A * I_l`` (``schedule.py``), separately for
   FFN channels (target ``target``) and for heads (target ``heads_target``);
3. the sparsities become whole kept counts with the step's exact total budget
   (``allocate``: a uniform and an adaptive model then have exactly the same parameter
   count), never more than the previous step kept (what is pruned stays pruned);
4. within a layer the lowest-scoring channels/groups go, where a score is summed over
   every coupled tensor discovery lists (gate and up rows, down column, biases; q rows
   of the group's query heads, k/v rows, o columns):
   ``"magnitude"`` = sum of ``|w|``; ``"taylor"`` = sum of ``|w * dL/dw|`` on calibration
   data, re-measured on the masked program at every step; ``"activation"`` (not in the
   paper) = GRIFFIN's rule on calibration data: the norm over tokens of each channel's
   token-normalised activation (for heads: of the group's columns of the o projection's
   input), also re-measured on the masked program at every step;
5. optionally the model trains under the new masks (``train=``, the incremental
   schedule; see ``incremental.py``), which changes the weights the next step scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram

from ..blocks import ParamSlice
from ..errors import IFPError
from ..passes import find_attention_blocks, find_ffn_blocks, insert_masks
from ..passes.program_edit import probe_module
from .importance import layer_cosines, normalise_importance
from .schedule import AMPLITUDE, MAX_SPARSITY, update_sparsity

METHODS = ("magnitude", "taylor", "activation")


def _group_sums(t: torch.Tensor, ps, n: int) -> torch.Tensor:
    """Per-channel (or per-group) sum of ``t`` over everything but its structure axis."""
    moved = t.movedim(ps.axis, 0)
    if isinstance(ps, ParamSlice):
        return sum(moved.narrow(0, o, n).reshape(n, -1).sum(1) for o in ps.offsets)
    return sum(moved.narrow(0, off, n * size).reshape(n, -1).sum(1) for off, size in ps.segments)


def _taylor_grads(module: torch.nn.Module, calibration: Sequence, extra: tuple = ()) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    grads = {k: torch.zeros_like(p) for k, p in params.items()}
    for ids in calibration:
        logits = module(ids, *extra)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        for (k, p), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[k] += g
    return grads


def structure_scores(ep: ExportedProgram, blocks, method: str = "magnitude", calibration: Sequence | None = None,
                     *, module: torch.nn.Module | None = None, extra: tuple = ()) -> list[torch.Tensor]:
    """One importance score per channel (FFN block) or key/value group (attention block).

    For ``"taylor"`` the gradient is taken through ``module(ids, *extra)`` (default
    ``ep.module()``), e.g. the masked program with the current masks.
    """
    if method not in METHODS:
        raise IFPError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "activation":
        return _activation_scores(ep, blocks, calibration, extra)
    state = {**ep.state_dict, **ep.constants}
    grads = None
    if method == "taylor":
        if not calibration:
            raise IFPError("Taylor importance needs calibration data (token ids [1, T])")
        grads = _taylor_grads(module if module is not None else ep.module(), calibration, extra)
    scores = []
    with torch.no_grad():
        for b in blocks:
            total = torch.zeros(b.width, dtype=torch.float64)
            for p in b.params:
                w = state[p.key].detach().double()
                if grads is not None:
                    if p.key not in grads:
                        raise IFPError(f"{b.kind} {b.index} ({b.name}): {p.key} is not a parameter, "
                                       "so it has no gradient for Taylor importance")
                    w = w * grads[p.key].double()
                total += _group_sums(w.abs(), p, b.width)
            scores.append(total)
    return scores


@torch.no_grad()
def _activation_scores(ep: ExportedProgram, blocks, calibration: Sequence | None, extra: tuple) -> list[torch.Tensor]:
    """GRIFFIN's rule over calibration tokens, through the (masked) program itself.

    Each token's activation row is normalised to unit length first, so a few tokens with
    huge activations do not decide alone; a channel's score is then its L2 norm over all
    calibration tokens. For a head group the columns of the o projection's input that the
    group occupies are summed (squared norms), which is the group's share of that input.
    """
    if not calibration:
        raise IFPError("activation importance needs calibration data (token ids [1, T])")
    nodes = [b.hidden_node if hasattr(b, "hidden_node") else b.o_input for b in blocks]
    probe = probe_module(ep, nodes)
    sq = [None] * len(blocks)
    for ids in calibration:
        for i, h in enumerate(probe(ids, *extra)):
            a = h.detach().reshape(-1, h.shape[-1]).double()
            a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            col = a.square().sum(0)
            sq[i] = col if sq[i] is None else sq[i] + col
    scores = []
    for b, col in zip(blocks, sq):
        if hasattr(b, "hidden_node"):
            scores.append(col.sqrt())
            continue
        o = next(p for p in b.params if p.role == "o")
        shape = [1] * len(o.shape)
        shape[o.axis] = -1
        scores.append(_group_sums(col.reshape(shape), o, b.width).sqrt())
    return scores


def channel_scores(ep: ExportedProgram, method: str = "magnitude", calibration: Sequence | None = None) -> list[torch.Tensor]:
    """One importance score per channel per FFN block (higher = keep)."""
    if method not in METHODS:
        raise IFPError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return structure_scores(ep, find_ffn_blocks(ep), method, calibration)


def masks_for_counts(scores: list[torch.Tensor], counts: list[int], previous: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Binary masks keeping the ``counts[l]`` top-scoring units; units pruned before stay pruned."""
    masks = []
    for i, (s, k) in enumerate(zip(scores, counts)):
        s = s.clone().double()
        if previous is not None:
            s[previous[i] == 0] = -math.inf
        masks.append(torch.zeros(s.numel()).index_fill(0, torch.topk(s, k).indices, 1.0))
    return masks


def masks_for_sparsity(scores: list[torch.Tensor], sparsity: list[float]) -> list[torch.Tensor]:
    """Binary masks keeping the top ``round((1 - s_l) * width)`` channels (at least 1)."""
    return masks_for_counts(scores, [min(s.numel(), max(1, round((1.0 - sp) * s.numel()))) for s, sp in zip(scores, sparsity)])


def allocate(widths: list[int], sparsity: list[float], kept_total: int, caps: list[int] | None = None) -> list[int]:
    """Whole kept counts near ``(1 - s_l) * w_l`` summing exactly to ``kept_total``.

    Largest-remainder rounding within ``[1, caps[l]]`` (``caps`` defaults to the widths):
    the budget is exact, so methods compared at one target hold the same parameters.
    """
    caps = list(widths) if caps is None else list(caps)
    if not sum(min(1, c) for c in caps) <= kept_total <= sum(caps):
        raise IFPError(f"cannot keep {kept_total} units in layers of widths {widths} (at most {caps})")
    want = [min(max((1.0 - s) * w, 1.0), c) for w, s, c in zip(widths, sparsity, caps)]
    counts = [max(1, min(c, math.floor(x))) for x, c in zip(want, caps)]
    order = sorted(range(len(widths)), key=lambda i: (counts[i] - want[i], i))  # most under-served first
    while sum(counts) < kept_total:
        i = next(i for i in order if counts[i] < caps[i])
        counts[i] += 1
        order = sorted(range(len(widths)), key=lambda i: (counts[i] - want[i], i))
    while sum(counts) > kept_total:
        i = next(i for i in reversed(order) if counts[i] > 1)
        counts[i] -= 1
        order = sorted(range(len(widths)), key=lambda i: (counts[i] - want[i], i))
    return counts


def uniform_masks(scores: list[torch.Tensor], target: float) -> list[torch.Tensor]:
    """The uniform baseline: every layer at sparsity ``target``, same total budget as adaptive."""
    widths = [s.numel() for s in scores]
    return masks_for_counts(scores, allocate(widths, [target] * len(widths), _budget(widths, target)))


def _budget(widths: list[int], target: float) -> int:
    return max(len(widths), round((1.0 - target) * sum(widths)))


@dataclass
class PruneResult:
    """Masks (FFN channels, key/value-head groups) and the schedule that produced them."""

    ffn_masks: list[torch.Tensor]
    head_masks: list[torch.Tensor] | None
    sparsity: list[list[float]] = field(default_factory=list)  # FFN, after each step
    head_sparsity: list[list[float]] = field(default_factory=list)
    importance: list[list[float]] = field(default_factory=list)  # measured at each step


def _check_target(name: str, value: float, *, zero_ok: bool = False) -> None:
    ok = (0.0 <= value < 1.0) if zero_ok else (0.0 < value < 1.0)
    if not isinstance(value, (int, float)) or not ok:
        raise IFPError(f"{name} must be in {'[0, 1)' if zero_ok else '(0, 1)'}, got {value}")


def adapt_prune(ep: ExportedProgram, calibration: Sequence[torch.Tensor], target: float, *, heads_target: float = 0.0,
                steps: int = 5, amplitude: float = AMPLITUDE, method: str = "magnitude",
                train: Callable[[int, list[torch.Tensor], list[torch.Tensor] | None], None] | None = None,
                progress: Callable[[str], None] | None = None) -> PruneResult:
    """Adapt-Pruner's masks: FFN sparsity ``target`` and key/value-head sparsity ``heads_target``.

    ``train(step, ffn_masks, head_masks)``, when given, trains the model (whose parameters
    ``ep`` shares) under the step's masks before the next step scores it.
    """
    _check_target("target sparsity", target)
    _check_target("heads target", heads_target, zero_ok=True)
    if method not in METHODS:
        raise IFPError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not calibration:
        raise IFPError("adaptive pruning needs calibration data (token ids [1, T])")
    if not isinstance(steps, int) or steps < 1:
        raise IFPError(f"steps must be a positive int, got {steps!r}")
    blocks = find_ffn_blocks(ep)
    attention = find_attention_blocks(ep) if heads_target > 0 else []
    if heads_target > 0:
        if not attention:
            raise IFPError("heads target given, but no attention block was recognised in the program "
                           "(ifp_compile.attention_report(ep) says what was tried); prune FFN channels only")
        if len(attention) != len(blocks):
            raise IFPError(f"{len(attention)} attention blocks and {len(blocks)} FFN blocks: cannot pair them by layer")
        total = sum(a.width for a in attention)
        if round((1.0 - heads_target) * total) < len(attention):
            worst = min(attention, key=lambda a: a.width)
            raise IFPError(f"removing {heads_target:.0%} of the {total} key/value heads would leave some layer with "
                           f"none (attention block {worst.index} ({worst.name}) has {worst.width}); every layer keeps "
                           "at least one key/value head with its query group")
    masked = insert_masks(ep, heads=bool(attention))
    module = masked.module()
    masked_blocks = find_ffn_blocks(masked)
    masked_attention = find_attention_blocks(masked) if attention else []
    widths = [b.width for b in blocks]
    head_widths = [a.width for a in attention]
    ffn = [torch.ones(w) for w in widths]
    heads = [torch.ones(w) for w in head_widths] if attention else None
    s_ffn, s_head = [0.0] * len(widths), [0.0] * len(head_widths)
    result = PruneResult(ffn, heads)
    for t in range(1, steps + 1):
        extra = (ffn, heads) if attention else (ffn,)
        cos = layer_cosines(masked, [(ids, *extra) for ids in calibration])
        if len(cos) != len(widths):
            raise IFPError(f"found {len(cos)} decoder layers but {len(widths)} FFN blocks: cannot pair them")
        importance = normalise_importance(cos)
        s_ffn = update_sparsity(s_ffn, importance, target=target, steps=steps, amplitude=amplitude)
        # one pass over the calibration data scores channels and head groups together
        all_scores = structure_scores(masked, masked_blocks + masked_attention, method, calibration,
                                      module=module, extra=extra)
        scores, head_scores = all_scores[:len(widths)], all_scores[len(widths):]
        counts = allocate(widths, s_ffn, _budget(widths, target * t / steps), caps=[int(m.sum()) for m in ffn])
        ffn = masks_for_counts(scores, counts, ffn)
        if attention:
            s_head = update_sparsity(s_head, importance, target=heads_target, steps=steps, amplitude=amplitude)
            head_counts = allocate(head_widths, s_head, _budget(head_widths, heads_target * t / steps),
                                   caps=[int(m.sum()) for m in heads])
            heads = masks_for_counts(head_scores, head_counts, heads)
        result.importance.append(importance)
        result.sparsity.append(list(s_ffn))
        result.head_sparsity.append(list(s_head))
        if progress is not None:
            kept = sum(int(m.sum()) for m in ffn)
            hk = f", {sum(int(m.sum()) for m in heads)}/{sum(head_widths)} kv heads" if attention else ""
            progress(f"step {t}/{steps}: {kept}/{sum(widths)} FFN channels{hk}")
        if train is not None:
            train(t, ffn, heads)
    result.ffn_masks, result.head_masks = ffn, heads
    return result


def adaptive_counts(ep: ExportedProgram, calibration: Sequence[torch.Tensor], keep: float, *, steps: int = 5,
                    amplitude: float = AMPLITUDE) -> list[int]:
    """Per-layer keep counts for an *instruction* predictor from Adapt-Pruner's allocation.

    IFPruning keeps the same fraction in every layer; here the layers the residual stream
    needs most keep more channels, at the same total. The result goes where per-layer
    counts are accepted: ``"keep": [...]`` in a training config, ``IFPredictor(counts=...)``.
    """
    _check_target("keep", keep)
    r = adapt_prune(ep, calibration, 1.0 - keep, steps=steps, amplitude=amplitude, method="magnitude")
    return [int(m.sum()) for m in r.ffn_masks]


def adaptive_masks(ep: ExportedProgram, calibration: Sequence[torch.Tensor], target: float, *, steps: int = 5,
                   amplitude: float = AMPLITUDE, method: str = "magnitude") -> tuple[list[torch.Tensor], list[list[float]]]:
    """FFN-only Adapt-Pruner masks for sparsity ``target``, and the sparsities after each step."""
    r = adapt_prune(ep, calibration, target, steps=steps, amplitude=amplitude, method=method)
    return r.ffn_masks, r.sparsity


__all__ = ["METHODS", "MAX_SPARSITY", "PruneResult", "adapt_prune", "adaptive_counts", "adaptive_masks", "allocate", "channel_scores",
           "masks_for_counts", "masks_for_sparsity", "structure_scores", "uniform_masks"]
