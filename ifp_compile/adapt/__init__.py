"""Adapt-Pruner (adaptive layer-wise structural pruning), first part: layer importance
from the residual stream and the per-layer sparsity schedule.

Not yet here (issue 5): attention heads, training between pruning steps (the
incremental schedule), ``ifp-compile prune``, ``to_module`` and the SmolLM2 benchmark.
"""

from .importance import layer_cosines, layer_importance, normalise_importance
from .prune import METHODS, adaptive_masks, channel_scores, masks_for_sparsity
from .schedule import AMPLITUDE, sparsity_schedule, update_sparsity

__all__ = ["AMPLITUDE", "METHODS", "adaptive_masks", "channel_scores", "masks_for_sparsity", "layer_cosines", "layer_importance", "normalise_importance", "sparsity_schedule",
           "update_sparsity"]
