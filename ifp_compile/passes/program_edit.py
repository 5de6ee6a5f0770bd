"""The only place that edits an ExportedProgram in place of re-exporting it.

``torch.export`` has no public API to resize, add or remove parameters, or to drop a
user input. A pass that needs to (specialization, which must cost what copying the
kept weights costs, not what an export costs) works on a *copy* of the graph and then
calls :func:`rebuild_program`, which

* derives the input specs from the placeholders that are left (in graph order),
* drops state_dict/constant entries no placeholder refers to any more,
* rewrites the root module-call signature and ``in_spec`` when user inputs go away,
* checks every placeholder's ``meta["val"]`` against its tensor (``ep.validate()``
  checks names and kinds, never shapes), then validates the program.

Keeping this in one module means every pass gets the same invariants, in the spirit of
ExecuTorch's ``create_constant_placeholder``/``constant_prop_pass`` helpers.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
)
from torch.fx import Node
from torch.utils import _pytree as pytree

from ..errors import ProgramError
from ..graph_utils import ASSERT_OPS, state_tensor


def copy_graph(ep: ExportedProgram) -> torch.fx.Graph:
    """A structural copy of ``ep.graph`` (nodes and meta dicts copied, tensors shared).

    Passes edit the copy and hand it to :func:`rebuild_program`, which compiles it once;
    building a GraphModule here too would generate the Python code twice.
    """
    graph = torch.fx.Graph()
    rv, old_out = graph.graph_copy(ep.graph, {}, return_output_node=True)
    new_out = graph.output(rv)  # graph_copy stops at the output node without emitting it
    new_out.meta = copy.copy(old_out.meta)
    return graph


def fake_mode_of(graph: torch.fx.Graph):
    """The fake mode the program's ``meta["val"]`` tensors live in."""
    from torch._guards import detect_fake_mode

    vals = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None:  # pragma: no cover - every exported program has one
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    return mode


def eliminate_dead_code(graph: torch.fx.Graph, removable: set[str] = frozenset()) -> None:
    """DCE that also drops assertions on dead values and dead nodes named in ``removable``.

    ``graph.eliminate_dead_code`` keeps impure nodes (``_assert_tensor_metadata``,
    ``scaled_dot_product_attention``...); those would keep a deleted predictor branch
    alive. Nodes the caller knows to be dead code (``removable``) go regardless.
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            if node.op == "call_function" and node.target in ASSERT_OPS:
                inputs = node.all_input_nodes
                if all(all(u.op == "call_function" and u.target in ASSERT_OPS for u in i.users) for i in inputs):
                    graph.erase_node(node)
                    changed = True
                continue
            if node.is_impure() and node.name not in removable:
                continue
            graph.erase_node(node)
            changed = True


def retarget_tied_placeholders(ep: ExportedProgram, prefer: str) -> None:
    """Make the graph read tied state through names *not* starting with ``prefer``.

    When the same tensor is registered under two names, export lifts it once and
    keeps the other placeholder unused; it picks the last name, which for a program
    with an inlined predictor is ``predictor.*``. The model's own names are the ones
    a user expects on its weights, so reads are moved to them (in place: ``ep`` is a
    program this package just created).
    """
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    unused = {}
    for n in placeholders:
        spec = specs[n.name]
        if spec.target is not None and not n.users and not spec.target.startswith(prefer):
            unused.setdefault(id(state_tensor(ep, spec)), n)
    changed = False
    for n in placeholders:
        spec = specs[n.name]
        if spec.target is None or not spec.target.startswith(prefer) or not n.users:
            continue
        twin = unused.get(id(state_tensor(ep, spec)))
        if twin is not None:
            n.replace_all_uses_with(twin)
            changed = True
    if changed:
        ep.graph_module.recompile()


def _drop_leaves(tree: Any, drop: set[str]) -> Any:
    """Remove leaves named in ``drop`` from a (args, kwargs) tree of placeholder names.

    A list/tuple whose leaves all go disappears too (``ffn_masks`` as a whole).
    """
    if isinstance(tree, (list, tuple)):
        kept = [_drop_leaves(t, drop) for t in tree]
        kept = [k for k, t in zip(kept, tree) if k is not _GONE]
        if tree and not kept:
            return _GONE
        return type(tree)(kept)
    if isinstance(tree, dict):
        kept = {k: _drop_leaves(v, drop) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not _GONE}
    return _GONE if tree in drop else tree


_GONE = object()


def _user_input_names(ep: ExportedProgram) -> list[str]:
    return [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]


def _copy_entry(entry: ModuleCallEntry) -> ModuleCallEntry:
    """A copy whose lists can be edited; treespecs are immutable and shared.

    ``copy.deepcopy`` would also work, but deep-copying a TreeSpec goes through a
    deprecated ``LeafSpec`` constructor and warns on every specialization.
    """
    sig = entry.signature
    if sig is not None:
        sig = dataclasses.replace(sig, inputs=list(sig.inputs), outputs=list(sig.outputs))
    return dataclasses.replace(entry, signature=sig)


def _new_call_graph(ep: ExportedProgram, removed: set[str]) -> tuple[list[ModuleCallEntry], Any]:
    """Root module-call entry without the removed user inputs (and the trees to map examples)."""
    entries = [_copy_entry(e) for e in ep.module_call_graph]
    root = entries[0]
    sig = root.signature
    if not removed or sig is None:
        return entries, None
    args, kwargs = pytree.tree_unflatten(_user_input_names(ep), sig.in_spec)
    new_args = _drop_leaves(tuple(args), removed)
    new_args = () if new_args is _GONE else new_args
    new_kwargs = _drop_leaves(dict(kwargs), removed)
    _, spec = pytree.tree_flatten((new_args, new_kwargs))
    fwd_names = sig.forward_arg_names
    if fwd_names is not None:  # a forward arg disappears when every leaf under it went
        gone = {fwd_names[i] for i, sub in enumerate(args) if i < len(fwd_names) and _drop_leaves(sub, removed) is _GONE}
        gone |= {k for k, v in kwargs.items() if _drop_leaves(v, removed) is _GONE}
        fwd_names = [n for n in fwd_names if n not in gone]
    entries[0] = ModuleCallEntry(
        fqn=root.fqn,
        signature=ModuleCallSignature(
            inputs=[a for a in sig.inputs if getattr(a, "name", None) not in removed],
            outputs=sig.outputs,
            in_spec=spec,
            out_spec=sig.out_spec,
            forward_arg_names=fwd_names,
        ),
    )
    return entries, (tuple(args), dict(kwargs))


def _new_example_inputs(ep: ExportedProgram, removed: set[str], trees) -> Any:
    if ep.example_inputs is None or trees is None:
        return ep.example_inputs
    ex_flat, _ = pytree.tree_flatten(ep.example_inputs)
    names = _user_input_names(ep)
    if len(ex_flat) != len(names):
        return None
    by_name = dict(zip(names, ex_flat))
    args = _drop_leaves(trees[0], removed)
    kwargs = _drop_leaves(trees[1], removed)
    args = () if args is _GONE else args
    return pytree.tree_map(lambda n: by_name[n], (tuple(args), dict(kwargs)))


def _shape_symbols(node: Node) -> set:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return set()
    return {sym for s in val.shape if isinstance(s, torch.SymInt) for sym in s.node.expr.free_symbols}


def rebuild_program(
    ep: ExportedProgram,
    graph: torch.fx.Graph,
    *,
    state_dict: dict[str, torch.Tensor],
    constants: dict[str, Any] | None = None,
    new_specs: dict[str, InputSpec] | None = None,
) -> ExportedProgram:
    """A new ExportedProgram for the edited copy ``graph`` of ``ep``'s graph.

    ``new_specs`` gives the InputSpec of placeholders the pass added. Placeholders
    that lost all users are removed here (with their state), user inputs included.
    """
    new_specs = new_specs or {}
    old_specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    removed_user_inputs: set[str] = set()
    removed_symbols: set = set()
    for node in list(graph.nodes):
        if node.op == "placeholder" and not node.users:
            spec = new_specs.get(node.name) or old_specs.get(node.name)
            if spec is not None and spec.kind == InputKind.USER_INPUT:
                removed_user_inputs.add(node.name)
                removed_symbols |= _shape_symbols(node)
            graph.erase_node(node)
    # a size symbol that only a removed input carried (the instruction length) goes too,
    # or torch.export.load warns that it "did not appear in the graph"
    removed_symbols -= {s for n in graph.nodes if n.op == "placeholder" for s in _shape_symbols(n)}
    range_constraints = {k: v for k, v in ep.range_constraints.items() if k not in removed_symbols}
    input_specs = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        spec = new_specs.get(node.name) or old_specs.get(node.name)
        if spec is None:
            raise ProgramError(f"internal: placeholder {node.name} has no input spec")
        input_specs.append(spec)
    used = {s.target for s in input_specs if s.target is not None}
    sd = {k: v for k, v in state_dict.items() if k in used}
    consts = {k: v for k, v in (constants if constants is not None else ep.constants).items() if k in used}
    signature = ExportGraphSignature(input_specs=input_specs, output_specs=list(ep.graph_signature.output_specs))
    call_graph, trees = _new_call_graph(ep, removed_user_inputs)
    new_ep = ExportedProgram(  # compiles the graph once and runs the verifier
        root=ep.graph_module,
        graph=graph,
        graph_signature=signature,
        state_dict=sd,
        range_constraints=range_constraints,
        module_call_graph=call_graph,
        example_inputs=_new_example_inputs(ep, removed_user_inputs, trees),
        constants=consts,
        verifiers=ep.verifiers,
    )
    check_placeholder_meta(new_ep)
    return new_ep


def check_placeholder_meta(ep: ExportedProgram) -> None:
    """Every state placeholder's ``meta["val"]`` has the shape and dtype of its tensor."""
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    bad = []
    for node in ep.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = specs[node.name]
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            continue
        t = state_tensor(ep, spec)
        v = node.meta.get("val")
        if not isinstance(t, torch.Tensor):
            continue
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(t.shape) or v.dtype != t.dtype:
            bad.append(f"{spec.target}: meta {None if v is None else tuple(v.shape)} vs tensor {tuple(t.shape)}")
    if bad:
        raise ProgramError("placeholder metadata out of date: " + "; ".join(bad))


def node_by_name(graph: torch.fx.Graph) -> dict[str, Node]:
    return {n.name: n for n in graph.nodes}


def probe_module(ep, node_names: list[str]):
    """``ep.module()`` rewired to return the named nodes' values, as a list, and nothing else.

    The instrumentation both probes use (FFN activations, layer boundaries): no hooks,
    no module names, and the unneeded tail of the graph (e.g. the LM head) is removed.
    """
    from torch.utils import _pytree as pytree

    gm = ep.module(check_guards=False)
    nodes = {n.name: n for n in gm.graph.nodes}
    outs = [nodes[name] for name in node_names]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (outs,)
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=pytree.tree_structure([0] * len(outs)))
    eliminate_dead_code(gm.graph)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
