"""``to_module``: the eager model with the specialised widths, for ``generate()`` with KV cache.

A specialised ExportedProgram is the artifact; but decoding loops, KV caches and sampling
live in eager code (``model.generate``). ``to_module`` applies the same slices as
``specialize`` to a copy of the model the program was exported from: every tensor that
discovery lists for a block is sliced along its structure axis, soft mask values are
folded into the down (or o) columns, and the owning ``nn.Linear`` (or GPT-2 ``Conv1D``)
gets its feature counts updated. The result is the same class with per-layer widths;
nothing is looked up by module name except the parameter names discovery recorded.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.export import ExportedProgram

from .blocks import AttentionBlock, ParamSlice
from .errors import IFPError, MaskError
from .masks import validate_masks
from .passes import attention_report, find_attention_blocks, find_ffn_blocks
from .slicing import take


def _resolve(names: dict[str, nn.Parameter], key: str) -> str:
    """The model's name for a program key (export may add a wrapper prefix such as ``lm.``)."""
    parts = key.split(".")
    for i in range(len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in names:
            return candidate
    raise IFPError(f"parameter {key} of the program is not a parameter of the model: "
                   "pass the model the program was exported from")


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, attr)
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    if isinstance(owner, nn.Linear) and attr == "weight":
        owner.out_features, owner.in_features = value.shape
    elif type(owner).__name__ == "Conv1D" and attr == "weight":  # GPT-2: weight [in, out]
        owner.nf = value.shape[1]


@torch.no_grad()
def to_module(model: nn.Module, program: ExportedProgram, mask=None, head_mask=None) -> nn.Module:
    """A copy of ``model`` equal to ``specialize(program, mask=mask, head_mask=head_mask)``.

    ``program`` is ``model``'s exported program (plain or masked); ``mask``/``head_mask``
    as for ``specialize`` (``None`` keeps everything). ``model`` is not modified.
    """
    blocks = find_ffn_blocks(program)
    work = []
    if mask is not None:
        work += list(zip(blocks, validate_masks(mask, blocks)))
    if head_mask is not None:
        attention = find_attention_blocks(program)
        if not attention:
            raise IFPError("head_mask= given, but no attention block was recognised:\n" + attention_report(program))
        heads = validate_masks(head_mask, attention, what="attention block", argument="head_mask")
        for a, m in zip(attention, heads):
            if not bool((m != 0).any()):
                raise MaskError(f"head_mask for attention block {a.index} ({a.name}) keeps no key/value head: "
                                "an eager attention layer needs at least one (the specialised program can drop it)")
        work += list(zip(attention, heads))
    originals = dict(model.named_parameters(remove_duplicate=False))
    # The tensors about to be sliced are replaced in the copy, never written: the memo makes
    # the copy start from the originals instead of duplicating them (half the copy's time
    # and no transient second copy of the FFN weights; this is on the time-to-first-token path).
    memo: dict[int, object] = {}
    for block, _ in work:
        for ps in block.params:
            p = originals[_resolve(originals, ps.key)]
            memo[id(p)] = p
    new = copy.deepcopy(model, memo)
    names = dict(new.named_parameters(remove_duplicate=False))
    for block, m in work:
        if block.shared_params:
            raise IFPError(f"{block.kind} {block.index} ({block.name}): {', '.join(block.shared_params)} is shared "
                           "with other layers; to_module slices parameters in place and cannot untie them")
        keep = torch.nonzero(m).flatten()
        scale = m[keep]
        soft = not bool((scale == 1).all())
        for ps in block.params:
            name = _resolve(names, ps.key)
            source = names[name].detach()
            if isinstance(ps, ParamSlice):
                idx = keep if ps.offsets == (0,) else torch.cat([keep + o for o in ps.offsets])
            else:
                idx = ps.index(keep)
            folded = None
            if soft and ps.role in ("down", "o"):
                folded = scale if isinstance(ps, ParamSlice) else torch.cat(
                    [scale.repeat_interleave(size) for _, size in ps.segments])
            _set(new, name, take(source, ps.axis, idx, folded))  # the slice specialize computes, bit for bit
        if isinstance(block, AttentionBlock):
            _set_head_counts(new, _resolve(names, block.params[-1].key), block, keep.numel())
    return new


#: attributes eager attention code reads its head counts from (transformers' Llama family,
#: Phi-3 through its config, GPT-2's ``split_size``); the graph passes need none of them
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_kv_heads")


def _set_head_counts(model: nn.Module, o_weight: str, block: AttentionBlock, kept: int) -> None:
    """Give the attention module (the o projection's parent) its own head counts."""
    path = o_weight.rsplit(".", 2)[0] if o_weight.count(".") >= 2 else ""
    attn = model.get_submodule(path)
    heads, kv = kept * block.heads_per_group, kept
    new_counts = {block.num_heads: heads, block.num_kv_heads: kv}
    for attr in _HEAD_ATTRS:
        old = getattr(attn, attr, None)
        if isinstance(old, int) and old in new_counts:
            setattr(attn, attr, kv if "key_value" in attr or "kv" in attr else heads)
    if isinstance(getattr(attn, "split_size", None), int) and attn.split_size == block.num_heads * block.head_dim:
        attn.split_size = heads * block.head_dim
    cfg = getattr(attn, "config", None)
    if cfg is not None and hasattr(cfg, "num_attention_heads"):
        cfg = copy.copy(cfg)  # a per-layer config: the model's stays as it was
        cfg.num_attention_heads = heads
        if getattr(cfg, "num_key_value_heads", None) is not None:
            cfg.num_key_value_heads = kv
        attn.config = cfg


__all__ = ["to_module"]
