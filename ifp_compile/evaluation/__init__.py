"""Evaluation: held-out loss per domain, math exact match and kept parameters for dense,
a static model and per-task masks of the same size (``ifp-compile eval``)."""

from .rows import MaskSource, ifpredictor_source, prompt_activation_source, random_source, static_source
from .run import EvalResult, Row, calibration, run_eval

__all__ = ["EvalResult", "MaskSource", "Row", "calibration", "ifpredictor_source", "prompt_activation_source",
           "random_source", "run_eval", "static_source"]
