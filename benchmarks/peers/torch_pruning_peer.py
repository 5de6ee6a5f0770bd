"""Peer baseline: Torch-Pruning's magnitude pruner on a Hugging Face Llama model.

Torch-Pruning (``pip install torch-pruning==1.6.1``; it requires only ``torch>=2.0`` and
``numpy``) builds a dependency graph by tracing autograd and removes coupled channels
together. Here it is restricted to the FFN: every decoder layer loses the same fraction
of its intermediate channels (rows of ``gate_proj``/``up_proj``, columns of
``down_proj``), ranked with local (per-layer) ranking by
``tp.importance.GroupMagnitudeImportance(p=2)``: a channel's score is the sum of squares
of its gate row, of its up row and of its down column, averaged over the three tensors. Embeddings, ``lm_head``, attention and the hidden size stay
as they are; this is checked after pruning.

Head pruning (``heads_ratio > 0``) is not offered: Torch-Pruning 1.6.1 cannot remove
key/value heads of a grouped-query attention model (see ``prune_ffn_channels``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

TP_VERSION = "1.6.1"
INSTALL_HINT = f"pip install torch-pruning=={TP_VERSION}"

GQA_REASON = (
    "Torch-Pruning {v} cannot remove key/value heads of a grouped-query-attention model: "
    "with prune_num_heads=True and num_heads given for q_proj/k_proj/v_proj, "
    "BasePruner._prune ranks heads of the *query* projection inside each KV group "
    "(n_heads_removed_per_group = ceil(ceil(head_pruning_ratio * num_q_heads) / num_kv_heads)) "
    "and then empties the pruning indices of k_proj/v_proj "
    "('disable head pruning for the kv layers if GQA is enabled, since they will be shared "
    "by multiple Q heads'), so num_key_value_heads never changes; only query heads are "
    "removed (its examples/LLMs/prune_llm.py does the same). Even that query-head mode "
    "fails on this model under transformers' default SDPA attention: the traced fused "
    "attention node is treated as an element-wise op coupling q_proj (576 outputs) with "
    "k_proj/v_proj (192), and the head importance view fails with \"shape '[9, -1]' is "
    "invalid for input of size 192\"; it works only with attn_implementation='eager'."
)


def _mlps(model: nn.Module) -> list[nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def prune_ffn_channels(
    model: nn.Module,
    example_ids: torch.Tensor,
    ratio: float,
    *,
    heads_ratio: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> nn.Module:
    """Remove ``ratio`` of every MLP's intermediate channels in place; return ``model``.

    ``model`` is a ``LlamaForCausalLM`` (pass a copy: it is modified), ``example_ids`` a
    ``[1, T]`` LongTensor used only to trace Torch-Pruning's dependency graph.
    ``progress``, when given, is called with a short message before and after each step.

    Uses ``tp.pruner.BasePruner`` (``MetaPruner``/``MagnitudePruner`` are aliases of it in
    1.6.1) with ``tp.importance.GroupMagnitudeImportance(p=2)``, ``global_pruning=False``
    (so the ratio is the same in every layer) and every module but the MLPs'
    ``gate_proj``/``up_proj``/``down_proj`` in ``ignored_layers``; a group is pruned only
    if none of the layers whose *outputs* it shrinks is ignored, so the hidden-size group
    (which shrinks ``o_proj``/``down_proj`` outputs and the embedding) and the attention
    groups are left alone, and only the intermediate groups
    ``{gate_proj out, up_proj out, act_fn, mul, down_proj in}`` remain.

    ``heads_ratio > 0`` raises ``NotImplementedError``: Torch-Pruning 1.6.1 has no way to
    remove key/value heads under grouped-query attention (``GQA_REASON`` says why).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if heads_ratio:
        raise NotImplementedError(GQA_REASON.format(v=TP_VERSION))
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the Torch-Pruning peer needs torch-pruning: {INSTALL_HINT}") from e

    say = progress or (lambda message: None)
    mlps = _mlps(model)
    prunable = {id(m) for mlp in mlps for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) and id(m) not in prunable]
    # The RMSNorm weights are plain parameters to Torch-Pruning; say which dim is the
    # channel one (it would guess the same, with a warning). Their group is never pruned.
    wrapped = {id(p) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)) for p in m.parameters()}
    unwrapped = [(p, 0) for p in model.parameters() if id(p) not in wrapped and p.dim() == 1]
    before = _shapes(model)
    inter = mlps[0].gate_proj.out_features
    keep = int(inter * (1 - ratio))  # what BasePruner keeps per layer (local ranking)

    # Tracing needs autograd: parameters must require grad and no_grad must be off.
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(True)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            say("Torch-Pruning: tracing the dependency graph")
            pruner = tp.pruner.BasePruner(
                model,
                example_inputs=example_ids,
                importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=False,
                pruning_ratio=ratio,
                ignored_layers=ignored,
                root_module_types=[nn.Linear],
                unwrapped_parameters=unwrapped,
                output_transform=lambda out: out.logits,
            )
            say(f"Torch-Pruning: pruning {ratio:.0%} of the FFN channels")
            pruner.step()
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        model.config.use_cache = use_cache
    del pruner

    # Check: only the FFNs changed, and uniformly.
    after = _shapes(model)
    changed = {n for n in before if before[n] != after[n]}
    allowed = {n for n in before if n.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"))}
    if changed - allowed:
        raise RuntimeError(f"Torch-Pruning changed more than the FFNs: {sorted(changed - allowed)[:5]}")
    for i, mlp in enumerate(mlps):
        got = (mlp.gate_proj.out_features, mlp.up_proj.out_features, mlp.down_proj.in_features)
        if got != (keep,) * 3:
            raise RuntimeError(f"layer {i}: FFN widths {got} after pruning, expected {keep}")
        mlp.intermediate_size = keep
    model.config.intermediate_size = keep
    say(f"Torch-Pruning: FFN {inter} -> {keep} channels per layer in {time.perf_counter() - start:.1f} s")
    return model


@torch.no_grad()
def held_out_loss(model: nn.Module, chunks: Sequence[torch.Tensor]) -> float:
    """Mean next-token cross-entropy over ``[1, T]`` chunks, weighted by predicted tokens."""
    total, count = 0.0, 0
    for ids in chunks:
        if ids.shape[-1] < 2:
            continue
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        target = ids[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
        count += target.numel()
    if count == 0:
        raise ValueError("held_out_loss needs at least one chunk of two or more tokens")
    return total / count


__all__ = ["GQA_REASON", "held_out_loss", "prune_ffn_channels"]
