"""Weights apart from graphs: checkpoints read on demand, weightless programs, streamed writes.

``checkpoint``  a Hugging Face safetensors directory, read tensor by tensor (no mmap)
``lazy``        recipes of weightless parameters, materialization, tracing with fake weights
``writer``      safetensors written one tensor at a time (real or weightless tensors alike)
``stream``      an interpreter that reads each weight when a node needs it, then drops it
"""

from .checkpoint import Checkpoint, CheckpointError
from .lazy import LazyWeight, export_weightless, is_weightless, lazy_of, materialize

__all__ = ["Checkpoint", "CheckpointError", "LazyWeight", "export_weightless", "is_weightless", "lazy_of", "materialize"]
