"""Mask predictors: modules mapping ``instruction_ids`` to one mask per FFN block."""

from .base import MaskPredictor, keep_counts
from .prompt_activation import PromptActivationPredictor, activation_probe

__all__ = ["MaskPredictor", "PromptActivationPredictor", "activation_probe", "keep_counts"]
