"""FFN discovery: find every FFN block structurally on the aten graph.

An FFN is *projection(s) of x into width w -> a region of pointwise ops that keeps w
-> projection back to the width of x*. Matching that shape, instead of op patterns,
covers every variant at once:

* gated (SwiGLU ``silu(g) * u``, GeGLU with exact or tanh GELU, either operand order),
* plain MLPs ``down(act(up(x)))`` with or without biases,
* fused gate+up (one projection to 2w, then ``chunk``/``split`` on the last dim),
* GPT-2's Conv1D (``addmm(b, x.view(-1, d), W)`` with ``[in, out]`` weights, and the
  ``view`` back to ``[..., w]``),
* activations written out by hand as pointwise chains (``0.5*x*(1+tanh(...))``).

A projection is ``aten.linear`` (weight ``[out, in]``), ``aten.addmm`` (weight
``[in, out]``) or ``aten.mm``/``aten.matmul`` with a weight placeholder, possibly
transposed. The walk goes *backwards* from each candidate down projection through
width-carrying nodes; it fails on anything that is not pointwise, a last-dim
preserving view, or a projection. Module names are never consulted for matching
(``nn_module_stack`` only labels blocks in messages).

Invariants of an accepted block (checked here, relied on by the passes):

* every width-carrying node has all its users inside the block (or in assertions),
  so slicing the intermediate axis cannot change any other value;
* all projections into the region read the same ``x``, and ``x`` has the width of
  the block's output, so a block with no channel left is replaced by zeros (+ b_down);
* a mask multiply (``h * m`` from ``insert_masks``) is recognised by its operand
  coming from a mask input (``ffn_masks*``) or from the predictor branch
  (``instruction_ids``), never from the model's own inputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from ..blocks import FFNBlock, ParamSlice
from ..errors import NoFFNFoundError, ProgramError
from ..graph_utils import (
    ASSERT_OPS,
    ProgramIndex,
    before_casts,
    is_tensor_state,
    last_dim,
    module_path_hint,
    val,
)

aten = torch.ops.aten

VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
IDENTITY_OPS = {
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.to.dtype,
    aten.to.dtype_layout,
    aten._to_copy.default,
    aten.dropout.default,
    aten.detach.default,
}
SPLIT_OPS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
TRANSPOSE_OPS = {aten.t.default, aten.transpose.int, aten.permute.default}
LINEAR_PW_OPS = {  # pointwise ops that are not an activation on their own
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.div.Tensor,
    aten.div.Scalar,
    aten.neg.default,
}
NAMED_ACTIVATIONS = {
    aten.silu.default: "silu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.gelu.default: "gelu",
}

#: what the error says was tried when nothing matches
PATTERNS_TRIED = (
    "gated FFN (act(gate) * up, either operand order; silu/gelu/gelu-tanh/relu or a "
    "hand-written pointwise activation), plain MLP down(act(up(x))) with or without "
    "biases, fused gate_up projection + chunk/split, Conv1D addmm with [in, out] weights; "
    "projections as aten.linear, aten.addmm or aten.mm/matmul with a weight placeholder"
)


@dataclass
class Projection:
    """A projection node with a weight placeholder."""

    node: Node
    x: Node  # the activation input as written (may be a flattening view)
    weight: Node  # placeholder
    bias: Node | None  # placeholder
    out_axis: int  # axis of the weight indexing output features
    in_axis: int
    extra: tuple[Node, ...] = ()  # helper nodes owned by the projection (a weight transpose)

    @property
    def out_features(self) -> int:
        return val(self.weight).shape[self.out_axis]

    @property
    def in_features(self) -> int:
        return val(self.weight).shape[self.in_axis]


def _is_state(node: object, specs) -> bool:
    return isinstance(node, Node) and node.op == "placeholder" and is_tensor_state(specs.get(node.name))


def as_projection(node: Node, specs) -> Projection | None:
    """Interpret ``node`` as a projection with a weight placeholder, or None."""
    if node.op != "call_function":
        return None
    t, args = node.target, node.args
    if t is aten.linear.default:
        x, w = args[0], args[1]
        b = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if _is_state(w, specs) and val(w) is not None and val(w).dim() == 2:
            if b is None or _is_state(b, specs):
                return Projection(node, x, w, b, out_axis=0, in_axis=1)
        return None
    if t is aten.addmm.default:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            return None
        b, x, w = args[0], args[1], args[2]
        if _is_state(w, specs) and _is_state(b, specs) and val(w).dim() == 2 and val(b).dim() == 1:
            return Projection(node, x, w, b, out_axis=1, in_axis=0)
        return None
    if t in (aten.mm.default, aten.matmul.default):
        x, w = args[0], args[1]
        if _is_state(w, specs) and val(w).dim() == 2:
            return Projection(node, x, w, None, out_axis=1, in_axis=0)
        if isinstance(w, Node) and w.op == "call_function" and w.target in TRANSPOSE_OPS:
            src = w.args[0]
            is_2d_swap = w.target is aten.t.default or (
                w.target is aten.transpose.int and sorted(a % 2 for a in w.args[1:3]) == [0, 1]
            ) or (w.target is aten.permute.default and list(w.args[1]) == [1, 0])
            if _is_state(src, specs) and val(src).dim() == 2 and is_2d_swap and len(w.users) == 1:
                return Projection(node, x, src, None, out_axis=0, in_axis=1, extra=(w,))
        return None
    return None


def _static_numel(v: torch.Tensor) -> int | None:
    """numel when every dim is static (symbolic arithmetic is slow and guards)."""
    n = 1
    for s in v.shape:
        if not isinstance(s, int):
            return None
        n *= s
    return n


def _strip_views(node: Node) -> Node:
    while isinstance(node, Node) and node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node


def _is_pointwise(target) -> bool:
    if target in IDENTITY_OPS:
        return True
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


def _split_chunks(split: Node) -> list[int] | None:
    """Chunk sizes of a split/chunk node on the last dim, or None."""
    v = val(split.args[0])
    if v is None:
        return None
    total = v.shape[-1]
    t = split.target
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if dim not in (-1, v.dim() - 1) or not isinstance(total, int):
        return None
    if t is aten.chunk.default:
        n = split.args[1]
        if total % n:
            return None
        return [total // n] * n
    if t is aten.split.Tensor:
        size = split.args[1]
        if not isinstance(size, int) or total % size:
            return None
        return [size] * (total // size)
    if t is aten.split_with_sizes.default:
        return list(split.args[1])
    return None


@dataclass
class _Walk:
    width: int
    region: list[Node] = field(default_factory=list)
    leaves: list[Projection] = field(default_factory=list)
    fused: dict[Node, list[int]] = field(default_factory=dict)  # proj node -> chunk indices used
    fused_splits: dict[Node, Node] = field(default_factory=dict)  # proj node -> split node
    channel_params: list[Node] = field(default_factory=list)
    mask_node: Node | None = None
    mask_source: Node | None = None


class _Reject(Exception):
    pass


class FFNDiscovery(ProgramIndex):
    """Runs the structural match over one program (see module docstring)."""

    def __init__(self, ep: ExportedProgram):
        super().__init__(ep)
        self.claimed: set[Node] = set()

    # -- walking -------------------------------------------------------------------
    def _carries_width(self, node: Node, w: int) -> bool:
        v = val(node)
        return v is not None and v.dim() >= 1 and last_dim(node) == w and _static_numel(v) != 1

    def _is_broadcast_constant(self, node: Node, w: int) -> bool:
        v = val(node)
        if v is None:
            return False
        return v.dim() == 0 or _static_numel(v) == 1 or (last_dim(node) == 1 and w != 1)

    def _walk(self, down: Projection) -> _Walk:
        start = down.node.args[1] if down.node.target is aten.addmm.default else down.node.args[0]
        w = last_dim(start)
        if w is None or w != down.in_features:
            raise _Reject("down input width unknown")
        walk = _Walk(width=w)
        seen: set[Node] = set()
        stack = [start]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.mask_branch or n in self.claimed:
                raise _Reject(f"{n.name} is a mask input or belongs to another block")
            proj = as_projection(n, self.specs)
            if proj is not None:
                if proj.out_features != w:
                    raise _Reject(f"projection {n.name} has {proj.out_features} outputs, not {w}")
                walk.leaves.append(proj)
                continue
            if n.op == "call_function" and n.target is operator.getitem:
                split = n.args[0]
                if isinstance(split, Node) and split.op == "call_function" and split.target in SPLIT_OPS:
                    sizes = _split_chunks(split)
                    proj = as_projection(split.args[0], self.specs)
                    if sizes is None or proj is None or any(s != w for s in sizes):
                        raise _Reject(f"split {split.name} is not a chunk of a projection into {w}")
                    walk.fused.setdefault(proj.node, []).append(n.args[1])
                    walk.fused_splits[proj.node] = split
                    if proj.node not in [p.node for p in walk.leaves]:
                        walk.leaves.append(proj)
                    walk.region.append(n)
                    continue
                raise _Reject(f"getitem {n.name} is not of a split")
            if n.op != "call_function":
                raise _Reject(f"{n.name} ({n.op}) is not computed inside an FFN")
            if n.target in VIEW_OPS:
                if last_dim(n.args[0]) != w or last_dim(n) != w:
                    raise _Reject(f"view {n.name} changes the last dim")
                walk.region.append(n)
                stack.append(n.args[0])
                continue
            if not _is_pointwise(n.target):
                raise _Reject(f"{n.name} ({n.target}) is not pointwise")
            walk.region.append(n)
            for a in n.all_input_nodes:
                if a in self.mask_branch:
                    if n.target is aten.mul.Tensor and walk.mask_node is None:
                        walk.mask_node, walk.mask_source = n, a
                        continue
                    raise _Reject(f"{n.name} uses a mask input in a way insert_masks does not")
                if self._carries_width(a, w):
                    if _is_state(a, self.specs):
                        shape = val(a).shape
                        if any(s != 1 for s in shape[:-1]):
                            raise _Reject(f"parameter {a.name} is not a per-channel vector")
                        walk.channel_params.append(a)
                    else:
                        stack.append(a)
                elif not self._is_broadcast_constant(a, w):
                    raise _Reject(f"{n.name} mixes in {a.name}, which does not broadcast over the width")
        return walk

    # -- checking ------------------------------------------------------------------
    def _check_users(self, walk: _Walk, down: Projection) -> None:
        inside = set(walk.region) | {down.node} | set(walk.fused_splits.values())
        for n in list(walk.region) + [p.node for p in walk.leaves] + list(walk.fused_splits.values()):
            for u in n.users:
                if u in inside or (u.op == "call_function" and u.target in ASSERT_OPS):
                    continue
                if u in self.mask_branch:  # the predictor's own probe may read activations
                    continue
                raise _Reject(f"{n.name} is also used by {u.name}, outside the block")

    def _activation(self, walk: _Walk) -> str:
        names = []
        for n in walk.region:
            t = n.target
            if t in NAMED_ACTIVATIONS:
                name = NAMED_ACTIVATIONS[t]
                if name == "gelu" and n.kwargs.get("approximate", "none") == "tanh":
                    name = "gelu_tanh"
                names.append(name)
        if names:
            return "+".join(sorted(set(names)))
        odd = sorted(
            {
                str(n.target).split(".")[1] if "." in str(n.target) else str(n.target)
                for n in walk.region
                if n.target not in LINEAR_PW_OPS
                and n.target not in IDENTITY_OPS
                and n.target not in VIEW_OPS
                and n.target is not operator.getitem
            }
        )
        return f"pointwise({','.join(odd)})" if odd else ""

    def _roles(self, walk: _Walk) -> dict[Node, str]:
        """gate/up label of each (unfused) projection: gate is the one an activation reads."""
        if len(walk.leaves) == 1:
            return {walk.leaves[0].node: "gate_up" if walk.fused else "up"}
        acts = [n for n in walk.region if n.target in NAMED_ACTIVATIONS or n.target not in LINEAR_PW_OPS | IDENTITY_OPS | VIEW_OPS]
        roles = {}
        for p in walk.leaves:
            feeds_act = any(p.node in a.all_input_nodes or _reaches(p.node, a, set(walk.region)) for a in acts)
            roles[p.node] = "gate" if feeds_act else "up"
        if list(roles.values()).count("gate") != 1:
            roles = {p.node: f"in{i}" for i, p in enumerate(walk.leaves)}
        return roles

    def try_block(self, down: Projection, index: int) -> FFNBlock:
        walk = self._walk(down)
        w = walk.width
        if not walk.leaves:
            raise _Reject("no projection into the region")
        streams = sum(len(walk.fused.get(p.node, [None])) for p in walk.leaves)
        for pnode, used in walk.fused.items():
            proj = next(p for p in walk.leaves if p.node == pnode)
            if sorted(used) != list(range(proj.out_features // w)):
                raise _Reject(f"not every chunk of {pnode.name} is used by the block")
        if streams not in (1, 2):
            raise _Reject(f"{streams} projections into the region")
        xs = {_strip_views(p.x) for p in walk.leaves}
        if len(xs) != 1:
            raise _Reject("projections into the region read different inputs")
        (x,) = xs
        if last_dim(x) is None or last_dim(x) != down.out_features:
            raise _Reject("the block does not map its input width back to itself")
        activation = self._activation(walk)
        gated = streams == 2
        if not activation and not gated:
            raise _Reject("no nonlinearity between the projections")
        self._check_users(walk, down)

        roles = self._roles(walk)
        params: list[ParamSlice] = []
        keys_seen: set[str] = set()

        def add(ph: Node, role: str, axis: int, offsets=(0,)):
            key = self.specs[ph.name].target
            if key in keys_seen:
                raise _Reject(f"{key} appears twice in the block")
            keys_seen.add(key)
            params.append(ParamSlice(key, ph.name, role, axis, tuple(offsets), tuple(val(ph).shape)))

        for p in walk.leaves:
            n_chunks = p.out_features // w
            offsets = tuple(i * w for i in range(n_chunks))
            role = roles[p.node]
            add(p.weight, role, p.out_axis, offsets)
            if p.bias is not None:
                add(p.bias, f"{role}_bias", 0, offsets)
        for c in walk.channel_params:
            add(c, "channel", val(c).dim() - 1)
        add(down.weight, "down", down.in_axis)
        down_bias = self.specs[down.bias.name].target if down.bias is not None else None

        # parameters read outside the block are reported, never silently sliced
        owners = {p.node for p in walk.leaves} | {down.node} | set(walk.region)
        for p in walk.leaves + [down]:
            owners.update(p.extra)
        shared = []
        for ps in params:
            ph = self.by_name[ps.placeholder]
            if any(u not in owners and u not in self.mask_branch for u in ph.users):
                shared.append(ps.key)

        mask_node = walk.mask_node
        start = down.node.args[1] if down.node.target is aten.addmm.default else down.node.args[0]
        hidden = start
        if mask_node is not None:
            hidden = next(a for a in mask_node.all_input_nodes if a is not walk.mask_source)
        hint = module_path_hint(down.node)
        name = hint.rsplit(".", 1)[0] if hint and "." in hint else f"ffn.{index}"
        region_nodes = [p.node for p in walk.leaves] + list(walk.fused_splits.values()) + walk.region
        region_nodes += [e for p in walk.leaves + [down] for e in p.extra]  # weight transposes
        region_nodes.sort(key=self.pos.__getitem__)
        return FFNBlock(
            index=index,
            name=name,
            width=w,
            activation=activation or "bilinear",
            gated=gated,
            fused_gate_up=bool(walk.fused),
            params=tuple(params),
            down_bias=down_bias,
            position=self.pos[down.node],
            input_node=x.name,
            down_node=down.node.name,
            hidden_node=hidden.name,
            region=tuple(n.name for n in region_nodes),
            mask_node=mask_node.name if mask_node is not None else None,
            mask_source=before_casts(walk.mask_source).name if walk.mask_source is not None else None,
            shared_params=tuple(shared),
        )

    def run(self) -> list[FFNBlock]:
        blocks: list[FFNBlock] = []
        for n in self.nodes:
            if n in self.mask_branch or n in self.claimed:
                continue
            down = as_projection(n, self.specs)
            if down is None:
                continue
            try:
                block = self.try_block(down, len(blocks))
            except _Reject:
                continue
            blocks.append(block)
            self.claimed.update(self.by_name[r] for r in block.region)
            self.claimed.add(n)
        return blocks


def _reaches(src: Node, dst: Node, within: set[Node]) -> bool:
    stack, seen = [src], set()
    while stack:
        n = stack.pop()
        if n is dst:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(u for u in n.users if u in within or u is dst)
    return False


def find_ffn_blocks(ep: ExportedProgram, *, require: bool = True) -> list[FFNBlock]:
    """Every FFN block of ``ep``, in execution order.

    Raises :class:`NoFFNFoundError` (naming the patterns tried) when there is none and
    ``require`` is true. A block whose weights are also read outside it lists them in
    ``shared_params`` and a warning is issued: :func:`specialize` slices a private copy
    for the block and leaves the shared tensor intact for its other users.
    """
    if not isinstance(ep, ExportedProgram):
        raise ProgramError(
            f"expected a torch.export.ExportedProgram, got {type(ep).__name__}; "
            "capture a model first with ifp_compile.export(model, example_args)"
        )
    blocks = FFNDiscovery(ep).run()
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):  # e.g. ModuleList of downs: label by position instead
        import dataclasses

        blocks = [dataclasses.replace(b, name=f"{b.name}.{b.index}") for b in blocks]
    if require and not blocks:
        raise NoFFNFoundError(
            f"no FFN block found in the program ({len(ep.graph.nodes)} nodes). Patterns tried: "
            + PATTERNS_TRIED
        )
    for b in blocks:
        if b.shared_params:
            import warnings

            warnings.warn(
                f"FFN block {b.name}: {', '.join(b.shared_params)} is also used outside the block; "
                "specialization will slice a private copy and leave it intact for the other users",
                stacklevel=2,
            )
    return blocks
