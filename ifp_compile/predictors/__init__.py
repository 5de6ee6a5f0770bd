"""Mask predictors: modules mapping ``instruction_ids`` to one mask per FFN block."""

from .base import MaskPredictor, keep_counts
from .if_predictor import IFPredictor, LMEncoder
from .prompt_activation import PromptActivationPredictor, activation_probe
from .soft_topk import SoftTopK
from .static_scales import StaticScales

__all__ = ["IFPredictor", "LMEncoder", "MaskPredictor", "PromptActivationPredictor", "SoftTopK", "StaticScales",
           "activation_probe", "keep_counts"]
