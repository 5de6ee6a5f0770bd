"""ONNX-level specialisation: export a program to ONNX once, specialise per task.

    import ifp_compile as ifp
    from ifp_compile import onnx as ifp_onnx
    base = ifp_onnx.export_onnx(ep)                  # onnx.ModelProto (once per model)
    small = ifp_onnx.specialize_onnx(base, masks)     # per task: slices initializers
    ifp_onnx.find_onnx_ffn_blocks(base)               # the blocks, as discovery sees them

``specialize_onnx`` also works on ONNX files ifp-compile did not produce (any
``torch.onnx.export`` of a supported architecture), with or without mask inputs.
Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import numpy as np

from .passes.onnx_discover_ffn import OnnxFFNBlock, find_onnx_ffn_blocks
from .passes.onnx_specialize import specialize_onnx
from .progress import status


def export_onnx(program, *, name: str = "program"):
    """``torch.onnx.export(program, dynamo=True)`` as an ``onnx.ModelProto``, with progress.

    ``program`` is an ExportedProgram (plain, masked or specialised); its dynamic
    dimensions stay dynamic in the ONNX graph.
    """
    import logging

    import torch

    # torch's ONNX registry logs one warning per torchvision op it cannot register on every
    # export ("torchvision is not installed"); it is noise for language models
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with status(f"exporting {name} to ONNX"):
            onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    finally:
        registry_log.setLevel(level)
    return onnx_program.model_proto


def initializer_count(model) -> int:
    """Scalars in a model's initializers (what ``count_parameters`` is for a program)."""
    from .passes.onnx_discover_ffn import _as_ir

    graph = _as_ir(model).graph
    return int(sum(int(np.prod(v.const_value.shape)) for v in graph.initializers.values() if v.const_value is not None))


__all__ = ["OnnxFFNBlock", "export_onnx", "find_onnx_ffn_blocks", "initializer_count", "specialize_onnx"]
