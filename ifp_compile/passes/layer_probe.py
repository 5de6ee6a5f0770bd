"""Decoder-layer boundaries on the residual stream, found structurally, and a probe.

Adapt-Pruner scores a decoder layer by how much it changes the residual stream: the
cosine similarity between the layer's input and output hidden states. No module names
are needed to find those two tensors:

- the layer's *output* is the residual add that consumes its FFN block's output
  (discovery gives the down projection; views, copies and dropout may sit in between);
- the add's other operand is the residual *before* the FFN (``h``); when ``h`` is itself
  an add (behind any dtype casts) of the residual and the attention branch, the layer
  *input* is the operand that
  is an ancestor of the other one (the branch is computed from the residual, never the
  reverse). Otherwise (no attention add found) ``h`` is taken as the input.

``layer_probe(ep)`` rewires ``ep.module()`` to return ``[in_0, out_0, in_1, out_1, ...]``,
as ``activation_probe`` does for FFN activations: an instrumentation pass, no hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from ..errors import ProgramError
from .discover_ffn import IDENTITY_OPS, VIEW_OPS, find_ffn_blocks
from .program_edit import probe_module

aten = torch.ops.aten
ADD_OPS = {aten.add.Tensor}


@dataclass(frozen=True)
class LayerBoundary:
    """The residual stream around one decoder layer (node names in ``ep.graph``)."""

    index: int
    block: str  # the FFN block's name
    input_node: str
    output_node: str


def _is_ancestor(a: Node, b: Node, limit: int = 5000) -> bool:
    """Whether ``a`` is computed before and feeds (transitively) into ``b``."""
    seen, stack = set(), [b]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is a:
            return True
        for p in n.all_input_nodes:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return False


def _residual_add(down: Node) -> Node | None:
    n = down
    while True:
        adds = [u for u in n.users if u.target in ADD_OPS]
        if adds:
            return adds[0]
        passthrough = [u for u in n.users if u.target in VIEW_OPS | IDENTITY_OPS]
        if len(n.users) != 1 or not passthrough:
            return None
        n = passthrough[0]


def find_layer_boundaries(ep: ExportedProgram) -> list[LayerBoundary]:
    """One boundary per FFN block, in execution order (clear error when none is found)."""
    blocks = find_ffn_blocks(ep)
    nodes = {n.name: n for n in ep.graph.nodes}
    out = []
    for b in blocks:
        add = _residual_add(nodes[b.down_node])
        if add is None:
            raise ProgramError(f"FFN block {b.index} ({b.name}): its output does not reach a residual add, "
                               "so the decoder layer around it cannot be delimited")
        branch = nodes[b.down_node]
        h = next((a for a in add.args if isinstance(a, Node) and not _is_ancestor(branch, a) and a is not branch),
                 None)
        if h is None:
            raise ProgramError(f"FFN block {b.index} ({b.name}): no residual operand beside the FFN output")
        while h.target in IDENTITY_OPS and h.args and isinstance(h.args[0], Node):
            h = h.args[0]  # dtype casts of the residual (RMSNorm's .to(float32))
        x = h
        if h.target in ADD_OPS:
            ops = [a for a in h.args if isinstance(a, Node)]
            if len(ops) == 2:
                if _is_ancestor(ops[0], ops[1]):
                    x = ops[0]
                elif _is_ancestor(ops[1], ops[0]):
                    x = ops[1]
        out.append(LayerBoundary(b.index, b.name, x.name, add.name))
    return out


def layer_probe(ep: ExportedProgram) -> tuple[torch.fx.GraphModule, list[LayerBoundary]]:
    """``ep.module()`` rewired to return ``[in_0, out_0, in_1, out_1, ...]``."""
    bounds = find_layer_boundaries(ep)
    gm = probe_module(ep, [name for b in bounds for name in (b.input_node, b.output_node)])
    return gm, bounds
