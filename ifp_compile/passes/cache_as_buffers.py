"""Declare a decode-step program's KV cache as mutable buffers (what ExecuTorch plans).

A decode-step program exported without strict mode over transformers' static cache holds
the cache twice: the wrapper's registered buffers (``key_cache_<i>``, ``value_cache_<i>``,
``cumulative_length_<i>``), which the graph never reads, and the cache object's own
tensors, lifted as *constant* tensors that ``index_copy_`` / ``copy_`` / ``add_`` update in
place. Torch runs that program as it is, but ExecuTorch's lowering cannot:

* the unused buffers alias the mutated constants, and functionalising a program whose
  inputs alias one another fails inside ``run_decompositions`` ("expected compiled_fn to
  be GraphModule, got <class 'function'>");
* a constant that the program mutates is refused ("Constant ... is mutated in the forward
  method. Pls register it as buffer").

So this pass removes the placeholders no node reads and re-declares every mutated
constant as a non-persistent buffer (the tensor stays where it was, in ``constants``).
ExecuTorch then plans the cache as mutable buffers that persist across calls of the
method, as in its own LLM export. Torch semantics are unchanged: the same graph, the
same tensors; only the signature says what the tensors are.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec

from ..errors import ProgramError
from .program_edit import copy_graph, rebuild_program


def mutated_placeholders(graph: torch.fx.Graph) -> set[str]:
    """Names of placeholders that an in-place op (a mutable schema) writes to."""
    return {
        n.args[0].name for n in graph.nodes
        if n.op == "call_function" and getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable
        and n.args and isinstance(n.args[0], torch.fx.Node) and n.args[0].op == "placeholder"
    }


def cache_as_buffers(program: ExportedProgram) -> ExportedProgram:
    """A copy of ``program`` whose in-place-updated constants are buffers and whose unread
    state placeholders are gone; ``program`` itself is not modified."""
    graph = copy_graph(program)
    mutated = mutated_placeholders(graph)
    if not mutated:
        raise ProgramError("not a decode-step program: nothing is updated in place (no KV cache); "
                           "export one with ifp_compile.export_decode_step")
    new_specs = {}
    for spec in program.graph_signature.input_specs:
        if spec.kind == InputKind.CONSTANT_TENSOR and spec.arg.name in mutated:
            new_specs[spec.arg.name] = InputSpec(InputKind.BUFFER, spec.arg, spec.target, persistent=False)
        elif spec.kind == InputKind.USER_INPUT and spec.arg.name in mutated:
            raise ProgramError(f"input {spec.arg.name} is updated in place: ExecuTorch programs take the cache "
                               "as state, not as an input")
    return rebuild_program(program, graph, state_dict=dict(program.state_dict), new_specs=new_specs)
