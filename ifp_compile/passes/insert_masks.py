"""Mask insertion: the masked reference program.

Every FFN block found by discovery is rewritten so that its intermediate activation is
multiplied by a mask right before the down projection:

    FFN(x) = W_down (m * h(x)) + b_down

With ``m = 1`` this is exactly the original program (``h * 1.0 == h`` bit for bit).
The masks come either from a new user input ``ffn_masks`` (a list, one 1-D float
tensor per block, in execution order) or, with ``predictor=``, from the predictor's
graph inlined as a branch that reads a new user input ``instruction_ids``.

This pass re-exports (``ep.module()`` -> edit the FX graph -> ``torch.export``) instead
of editing the program in place: adding user inputs and a whole subgraph with its own
parameters is exactly what export does well, and insertion happens once per model, so
its cost (one export) does not matter. Specialisation, which runs once per task, edits
the program directly (see ``program_edit``).
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.export import Dim, ExportedProgram
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.utils import _pytree as pytree

from ..errors import IFPError, ProgramError
from ..graph_utils import HEAD_MASK_PREFIX, INSTRUCTION_INPUT, MASK_INPUT_PREFIX, mask_roots, user_input_nodes
from ..progress import status
from ..weights.lazy import call_with_fake_weights, export_weightless
from ..weights.writer import storage_key
from .discover_attention import attention_report, find_attention_blocks
from .discover_ffn import find_ffn_blocks
from .program_edit import retarget_tied_placeholders

aten = torch.ops.aten


def _example_inputs(ep: ExportedProgram) -> tuple[tuple, dict]:
    """The program's example inputs, or zeros shaped like its user inputs."""
    if ep.example_inputs is not None:
        return ep.example_inputs
    flat = []
    for n in user_input_nodes(ep):
        v = n.meta["val"]
        shape = [s if isinstance(s, int) else optimization_hint(s) for s in v.shape]
        flat.append(torch.zeros(shape, dtype=v.dtype))
    return pytree.tree_unflatten(flat, ep.call_spec.in_spec)


def _dim_for(ep: ExportedProgram, size, dims: dict) -> object:
    """The ``Dim`` re-exporting a symbolic size with the source's range.

    A plain symbol becomes a named ``Dim`` with the source's min/max (one ``Dim`` per
    symbol, so inputs that shared a size still share it); a derived size falls back
    to ``Dim.DYNAMIC`` and export infers it.
    """
    import sympy

    expr = size.node.expr
    if not isinstance(expr, sympy.Symbol):
        return Dim.DYNAMIC
    if expr not in dims:
        vr = ep.range_constraints.get(expr)
        lo = int(vr.lower) if vr is not None and vr.lower.is_finite else None
        hi = int(vr.upper) if vr is not None and vr.upper.is_finite else None
        dims[expr] = Dim(f"ifp_{expr}", min=lo, max=hi)
    return dims[expr]


def _dynamic_shapes(ep: ExportedProgram, arg_names: list[str]) -> dict:
    """Dynamic dims of ``ep``'s user inputs, as a ``dynamic_shapes`` dict for re-export."""
    flat = []
    by_symbol: dict = {}
    for n in user_input_nodes(ep):
        shape = n.meta["val"].shape
        dims = {i: _dim_for(ep, s, by_symbol) for i, s in enumerate(shape) if not isinstance(s, int)}
        flat.append(dims or None)
    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    spec = dict(zip(arg_names, args))
    spec.update(kwargs)
    return spec


def _tie_shared_storage(root: nn.Module, sub: nn.Module) -> None:
    """Make ``sub`` reuse ``root``'s Parameter objects where they hold the same storage.

    The predictor usually reads the model's own weights (the prompt-activation probe
    is the model itself). Re-pointing those attributes at the very same Parameter
    objects lets export lift them once, so the program holds each weight once.
    """
    by_storage = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        by_storage.setdefault(storage_key(p), p)
    for mod_name, mod in sub.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)):
            twin = by_storage.get(storage_key(p))  # weightless tensors: the same object, not the same address
            if twin is not None and twin is not p:
                setattr(mod, pname, twin)


def _check_predictor(predictor: nn.Module, blocks) -> torch.Tensor:
    if not isinstance(predictor, nn.Module):
        raise IFPError(f"predictor must be an nn.Module mapping instruction_ids to masks, got {type(predictor).__name__}")
    example = (
        predictor.example_instruction()
        if hasattr(predictor, "example_instruction")
        else torch.zeros(1, 8, dtype=torch.long)
    )
    with torch.no_grad():  # shapes only: a weightless predictor runs on fake weights
        masks = call_with_fake_weights(predictor, example)
    if not isinstance(masks, (list, tuple)) or len(masks) != len(blocks):
        got = len(masks) if isinstance(masks, (list, tuple)) else type(masks).__name__
        raise IFPError(f"predictor returned {got} masks for a program with {len(blocks)} FFN blocks")
    for b, m in zip(blocks, masks):
        if not isinstance(m, torch.Tensor) or m.shape != (b.width,):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise IFPError(f"predictor mask for FFN block {b.index} ({b.name}) has shape {shape}, expected ({b.width},)")
    return example


def _in_dtype_of(graph: torch.fx.Graph, mask: torch.fx.Node, h: torch.fx.Node) -> torch.fx.Node:
    """``mask`` converted to the dtype of the activation ``h`` it multiplies.

    Masks are float32 (inputs) or whatever the predictor emits; in a bf16/fp16 program
    ``h * m`` would otherwise promote the FFN to float32. The conversion rounds ``m`` to
    ``h``'s dtype once, and the product is computed in that dtype: the masked reference's
    semantics in half precision (docs/architecture.md, "Precision"). Float32 programs
    get no conversion, so their graphs are unchanged.
    """
    dtype = h.meta["val"].dtype
    if dtype == torch.float32:
        return mask
    return graph.call_function(aten.to.dtype, (mask, dtype))


def insert_masks(ep: ExportedProgram, predictor: nn.Module | None = None, *, heads: bool = False) -> ExportedProgram:
    """The masked reference program of ``ep`` (``ep`` itself is not modified).

    Without ``predictor``: inputs are ``ep``'s inputs plus ``ffn_masks`` (list of 1-D
    float tensors). With it: ``ep``'s inputs plus ``instruction_ids`` (``[1, T]`` long,
    dynamic ``T``).

    ``heads=True`` also masks attention heads: one more input ``head_masks``, a list with
    one 1-D tensor per attention block holding one value per key/value head. The merged
    attention output is multiplied, right before the o projection, by the mask repeated
    over the group's query heads and head_dim: ``o(a * repeat(m))``. Query heads are
    independent through softmax, so a zero removes exactly that group's contribution.
    """
    if not isinstance(ep, ExportedProgram):
        raise ProgramError(f"insert_masks() takes a torch.export.ExportedProgram, got {type(ep).__name__}")
    if mask_roots(ep):
        raise ProgramError(
            "the program already has masks (inputs "
            + ", ".join(n.name for n in mask_roots(ep))
            + "); insert_masks applies to an unmasked program"
        )
    blocks = find_ffn_blocks(ep)
    attention = []
    if heads:
        if predictor is not None:
            raise ProgramError("head masks are static-pruning inputs: use heads=True without a predictor")
        attention = find_attention_blocks(ep)
        if not attention:
            raise ProgramError("heads=True, but no attention block was recognised:\n" + attention_report(ep))
    example_args, example_kwargs = _example_inputs(ep)
    example_pred = _check_predictor(predictor, blocks) if predictor is not None else None

    gm = ep.module(check_guards=False)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    info = graph._codegen.pytree_info
    arg_names = list(info.orig_args)

    # new inputs are positional: their placeholders follow the positional ones (the flat
    # input order is positional leaves, then keyword leaves)
    n_positional = len(pytree.tree_leaves(tuple(example_args)))
    anchor = placeholders[n_positional - 1] if n_positional else placeholders[0]
    place = graph.inserting_after if n_positional else graph.inserting_before
    with place(anchor):
        if predictor is None:
            mask_values = []
            prev = None
            for b in blocks:  # in block order: the flat input order is the list order
                with graph.inserting_after(prev) if prev is not None else place(anchor):
                    prev = graph.placeholder(f"{MASK_INPUT_PREFIX}_{b.index}")
                mask_values.append(prev)
            extra_name, extra_example = MASK_INPUT_PREFIX, [torch.ones(b.width) for b in blocks]
            extra_dynamic = [None] * len(blocks)
            head_values = []
            for a in attention:
                with graph.inserting_after(prev):
                    prev = graph.placeholder(f"{HEAD_MASK_PREFIX}_{a.index}")
                head_values.append(prev)
        else:
            instr = graph.placeholder(INSTRUCTION_INPUT)
            _tie_shared_storage(gm, predictor)
            gm.add_submodule("predictor", predictor)
            last_placeholder = [n for n in graph.nodes if n.op == "placeholder"][-1]
            with graph.inserting_after(last_placeholder):
                out = graph.call_module("predictor", (instr,))
            mask_values = []
            prev = out
            for b in blocks:
                with graph.inserting_after(prev):
                    prev = graph.call_function(operator.getitem, (out, b.index))
                mask_values.append(prev)
            extra_name, extra_example = INSTRUCTION_INPUT, example_pred
            extra_dynamic = {1: Dim.DYNAMIC}

    for b, m in zip(blocks, mask_values):
        down = nodes[b.down_node]
        start = down.args[1] if down.target is aten.addmm.default else down.args[0]
        with graph.inserting_before(down):
            masked = graph.call_function(aten.mul.Tensor, (start, _in_dtype_of(graph, m, start)))
        down.replace_input_with(start, masked)
    if attention:
        for a, m in zip(attention, head_values):
            o, o_in = nodes[a.o_node], nodes[a.o_input]
            with graph.inserting_before(o):
                per_feature = graph.call_function(aten.repeat_interleave.self_int, (m, a.heads_per_group * a.head_dim))
                masked = graph.call_function(aten.mul.Tensor, (o_in, _in_dtype_of(graph, per_feature, o_in)))
            o.replace_input_with(o_in, masked)

    new_args = tuple(example_args) + (extra_example,)
    added = [extra_name]
    if attention:
        new_args += ([torch.ones(a.num_kv_heads) for a in attention],)
        added.append(HEAD_MASK_PREFIX)
    # the generated forward() takes the positional inputs first, then the keyword ones:
    # the new inputs are positional, so they go between the two
    n_pos = len(example_args)
    new_names = arg_names[:n_pos] + added + arg_names[n_pos:]
    graph._codegen.pytree_info = info._replace(
        orig_args=new_names,
        in_spec=pytree.tree_structure((new_args, dict(example_kwargs))),
    )
    graph.lint()
    gm.recompile()
    dynamic = _dynamic_shapes(ep, arg_names)
    dynamic[extra_name] = extra_dynamic
    if attention:
        dynamic[HEAD_MASK_PREFIX] = [None] * len(attention)
    what = "predictor branch" if predictor is not None else "FFN masks"
    with status(f"re-exporting with {what} for {len(blocks)} FFN blocks"), torch.no_grad():
        masked_ep = export_weightless(gm, new_args, dict(example_kwargs), dynamic_shapes=dynamic, strict=False)
    if predictor is not None:
        retarget_tied_placeholders(masked_ep, prefer="predictor.")
    found = find_ffn_blocks(masked_ep)
    if len(found) != len(blocks) or any(b.mask_node is None for b in found):
        raise ProgramError(  # pragma: no cover - would be a bug in this pass
            f"internal: the masked program has {len(found)} blocks, "
            f"{sum(b.mask_node is not None for b in found)} with masks, expected {len(blocks)}"
        )
    if attention:
        found_attention = find_attention_blocks(masked_ep)
        if len(found_attention) != len(attention) or any(a.mask_node is None for a in found_attention):
            raise ProgramError(  # pragma: no cover - would be a bug in this pass
                f"internal: the masked program has {len(found_attention)} attention blocks, "
                f"{sum(a.mask_node is not None for a in found_attention)} with head masks, expected {len(attention)}"
            )
    return masked_ep
