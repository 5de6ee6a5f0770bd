"""Adapt-Pruner (adaptive layer-wise structural pruning), first part: layer importance
from the residual stream and the per-layer sparsity schedule.

Not yet here (issue 5): attention heads, within-layer Taylor ranking, the incremental
prune-and-train loop, ``ifp-compile prune`` and ``to_module``.
"""

from .importance import layer_cosines, layer_importance, normalise_importance
from .schedule import AMPLITUDE, sparsity_schedule, update_sparsity

__all__ = ["AMPLITUDE", "layer_cosines", "layer_importance", "normalise_importance", "sparsity_schedule",
           "update_sparsity"]
