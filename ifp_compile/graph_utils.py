"""Small read-only helpers over exported programs shared by the passes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec
from torch.fx import Node

aten = torch.ops.aten

#: user inputs that carry masks (insert_masks) or the instruction (predictor branch).
MASK_INPUT_PREFIX = "ffn_masks"
HEAD_MASK_PREFIX = "head_masks"
INSTRUCTION_INPUT = "instruction_ids"

#: ops that only assert something about a tensor; they have no users but must not
#: keep a dead region alive.
ASSERT_OPS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
}

#: dtype conversions: ``insert_masks`` casts a float32 mask to the dtype of the activation
#: it multiplies (bf16/fp16 programs), and discovery looks through them to the mask itself.
CAST_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default}

_TENSOR_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def input_specs_by_node(ep: ExportedProgram) -> dict[str, InputSpec]:
    """placeholder name -> its InputSpec."""
    return {spec.arg.name: spec for spec in ep.graph_signature.input_specs}


def is_tensor_state(spec: InputSpec | None) -> bool:
    """A placeholder holding a parameter, buffer or constant tensor (not a user input)."""
    return spec is not None and spec.kind in _TENSOR_KINDS and spec.target is not None


def state_tensor(ep: ExportedProgram, spec: InputSpec) -> torch.Tensor:
    """The tensor behind a parameter/buffer/constant placeholder."""
    if spec.kind == InputKind.CONSTANT_TENSOR or spec.target in ep.constants:
        return ep.constants[spec.target]
    return ep.state_dict[spec.target]


def user_input_nodes(ep: ExportedProgram) -> list[Node]:
    specs = input_specs_by_node(ep)
    return [
        n
        for n in ep.graph.nodes
        if n.op == "placeholder" and specs[n.name].kind == InputKind.USER_INPUT
    ]


def mask_roots(ep: ExportedProgram) -> list[Node]:
    """User inputs that feed masks: ``ffn_masks*``, ``head_masks*`` and ``instruction_ids``."""
    return [
        n
        for n in user_input_nodes(ep)
        if n.name.startswith((MASK_INPUT_PREFIX, HEAD_MASK_PREFIX)) or n.name == INSTRUCTION_INPUT
    ]


def mask_branch(ep: ExportedProgram) -> set[Node]:
    """Nodes computed from the mask inputs alone: the masks and the predictor branch.

    A node that also depends on a model input (the ``h * m`` multiply and everything
    after it) is part of the model, not of the branch.
    """
    roots = mask_roots(ep)
    if not roots:
        return set()
    model_inputs = [n for n in user_input_nodes(ep) if n not in roots]
    return forward_closure(roots) - forward_closure(model_inputs)


def _closure(roots: Iterable[Node], step) -> set[Node]:
    seen: set[Node] = set()
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(step(n))
    return seen


def forward_closure(roots: Iterable[Node]) -> set[Node]:
    """Every node that depends (transitively) on one of ``roots``, roots included."""
    return _closure(roots, lambda n: n.users)


def backward_closure(roots: Iterable[Node]) -> set[Node]:
    """Every node that ``roots`` depend on, roots included."""
    return _closure(roots, lambda n: n.all_input_nodes)


def before_casts(node: Node) -> Node:
    """The value ``node`` is a dtype conversion of (``node`` itself if it is not one)."""
    while node.op == "call_function" and node.target in CAST_OPS and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def val(node: Node) -> torch.Tensor | None:
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def last_dim(node: Node) -> int | None:
    """Static size of the last dim of ``node``'s value, or None (scalar, symbolic, unknown)."""
    v = val(node)
    if v is None or v.dim() == 0:
        return None
    s = v.shape[-1]
    return s if isinstance(s, int) else None


def module_path_hint(node: Node) -> str | None:
    """The module path recorded by export for ``node`` (a hint for messages, not a contract)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path or None


class ProgramIndex:
    """What every discovery pass looks up on a program: specs, node order, the mask branch."""

    def __init__(self, ep: ExportedProgram):
        self.ep = ep
        self.specs = input_specs_by_node(ep)
        self.nodes = list(ep.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.mask_branch = mask_branch(ep)
        self.by_name = {n.name: n for n in self.nodes}
