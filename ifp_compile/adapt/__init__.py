"""Adapt-Pruner: adaptive layer-wise structural pruning (FFN channels and key/value-head
groups) on the compiler's passes, with the incremental prune-and-train schedule.

Static pruning is specialisation with a fixed, non-uniform mask: ``adapt_prune`` finds
the masks, ``ifp_compile.specialize(ep, mask=..., head_mask=...)`` folds them, and
``to_module`` gives the eager Hugging Face model with resized layers.
"""

from .importance import layer_cosines, layer_importance, normalise_importance
from .prune import (METHODS, PruneResult, adapt_prune, adaptive_counts, adaptive_masks, allocate, channel_scores, masks_for_counts,
                    masks_for_sparsity, structure_scores, uniform_masks)
from .schedule import AMPLITUDE, sparsity_schedule, update_sparsity

__all__ = ["AMPLITUDE", "METHODS", "PruneResult", "adapt_prune", "adaptive_counts", "adaptive_masks", "allocate", "channel_scores",
           "layer_cosines", "layer_importance", "masks_for_counts", "masks_for_sparsity", "normalise_importance",
           "sparsity_schedule", "structure_scores", "uniform_masks", "update_sparsity"]
