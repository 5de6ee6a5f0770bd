"""Run a graph whose weights are weightless, reading each weight only while a node needs it.

Why: a predictor that reads the model itself (the prompt-activation probe, an IFPredictor
whose encoder is the target's first layers) needs real values, and an 8B checkpoint does
not fit in memory next to anything else. Executing the graph node by node, each weightless
tensor is materialized when a node takes it as an argument and dropped as soon as that
node has run, so the resident weights are those of one operation at a time (the largest is
the embedding table): the model is run *layer by layer*, straight from its checkpoint.
Tensors in memory pass through untouched, so the same call runs an ordinary graph.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Interpreter

from .lazy import lazy_of


def _real(value):
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        lazy = lazy_of(value)
        if lazy is not None:
            return lazy.materialize()
    return value


class StreamingInterpreter(Interpreter):
    """An FX interpreter that materializes weightless arguments per node (no caching)."""

    def fetch_args_kwargs_from_env(self, n):
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return torch.utils._pytree.tree_map(_real, (args, kwargs))


def has_weightless(gm: torch.nn.Module) -> bool:
    return any(lazy_of(p) is not None for p in gm.parameters()) or any(lazy_of(b) is not None for b in gm.buffers())


def run(gm: GraphModule, *args):
    """``gm(*args)``, streaming weightless weights (an ordinary call when there are none)."""
    if not has_weightless(gm):
        return gm(*args)
    with torch.no_grad():
        return StreamingInterpreter(gm).run(*args)
