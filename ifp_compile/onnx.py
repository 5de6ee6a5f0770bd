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
from .errors import ProgramError
from .progress import status


def export_onnx_model(program, *, name: str = "program"):
    """``program`` as an ``onnx_ir.Model`` whose parameters are read only when written.

    ``program`` is an ExportedProgram (plain, masked or specialised; in memory or
    weightless); its dynamic dimensions stay dynamic. The graph is exported from fake
    parameters (``torch.onnx.export(..., optimize=False)`` never sees a value), every
    parameter initializer becomes an ``onnx_ir.LazyTensor`` that produces the parameter's
    bytes when the model is written (read and sliced from its checkpoint for a weightless
    program), and then the exporter's own optimisation (``_optimize``: ``optimize_ir``
    without its slow pattern rewrites, and the ONNX fusions) runs with the parameters hidden, so no weight is folded or copied: a
    projection keeps its ``[out, in]`` weight under its state_dict name, read through a
    ``Transpose`` (ONNX Runtime folds it when the session is created).
    """
    import logging

    import onnx_ir as ir
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from onnx_ir.tensor_adapters import from_torch_dtype

    from .program_weights import parameters

    params = parameters(program)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    fakes: dict[int, torch.nn.Parameter] = {}
    for t in params.values():
        if id(t) not in fakes:
            with mode:
                fakes[id(t)] = torch.nn.Parameter(torch.empty(t.shape, dtype=t.dtype), requires_grad=False)
    # torch's ONNX registry logs one warning per torchvision op it cannot register on every
    # export ("torchvision is not installed"); it is noise for language models
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    saved = dict(program._state_dict)
    try:
        for key, t in params.items():
            program._state_dict[key] = fakes[id(t)]
        with status(f"exporting {name} to ONNX"):
            onnx_program = torch.onnx.export(program, dynamo=True, optimize=False, verbose=False)
    finally:
        program._state_dict.clear()
        program._state_dict.update(saved)
        registry_log.setLevel(level)
    model = onnx_program.model
    hidden = {}
    for key, value in model.graph.initializers.items():
        if key in params:
            t = params[key]
            value.const_value = ir.LazyTensor(_producer(t), dtype=from_torch_dtype(t.dtype),
                                              shape=ir.Shape(tuple(t.shape)), name=key)
            hidden[key] = value
    import onnxscript

    stored = {key: v.const_value for key, v in hidden.items()}
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    dedup_level = dedup_log.level
    dedup_log.setLevel(logging.ERROR)  # "skipped deduplication of <weight>": exactly what is wanted
    try:
        for v in hidden.values():
            v.const_value = None  # the optimizer folds and deduplicates only what it can see
        _optimize(model)
        onnxscript.rewriter.onnx_fusions.fuse(model)
    finally:
        dedup_log.setLevel(dedup_level)
        for key, v in hidden.items():
            v.const_value = stored[key]
    missing = [k for k, v in model.graph.initializers.items() if v.const_value is None]
    if missing:  # pragma: no cover - the optimizer renamed a weight it could not see
        raise ProgramError(f"internal: ONNX initializers without values after optimisation: {missing[:3]}")
    return model


def _optimize(model) -> None:
    """``onnxscript.optimizer.optimize_ir`` without its pattern-rewrite pass.

    Why: on SmolLM2 the default rewrite rules changed 13 of 2,413 nodes but took 55 s of
    a 97 s export (hundreds of thousands of pattern-match attempts over a 30-layer graph);
    constant folding, inlining, dead-code removal, initializer deduplication and CSE take
    2.5 s, and ONNX Runtime applies its own graph rewrites when a session is created.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    import onnxscript

    common.InlinePass()(model)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(), common.OutputFixPass(), common.NameFixPass(),
    )(model)


def _producer(t):
    """The bytes of parameter ``t`` as an onnx_ir tensor, made when asked for."""
    import onnx_ir as ir

    from .weights.writer import values

    return lambda: ir.tensor(values(t))


def export_onnx(program, *, name: str = "program"):
    """:func:`export_onnx_model` as an ``onnx.ModelProto`` (every weight read into the proto).

    For models that fit in memory; the build writes :func:`export_onnx_model`'s lazy
    weights straight to external data instead.
    """
    import onnx_ir as ir

    return ir.to_proto(export_onnx_model(program, name=name))


def initializer_count(model) -> int:
    """Scalars in a model's initializers (what ``count_parameters`` is for a program)."""
    from .passes.onnx_discover_ffn import _as_ir

    graph = _as_ir(model).graph
    return int(sum(int(np.prod(v.const_value.shape)) for v in graph.initializers.values() if v.const_value is not None))


__all__ = ["OnnxFFNBlock", "export_onnx", "export_onnx_model", "find_onnx_ffn_blocks", "initializer_count", "specialize_onnx"]
