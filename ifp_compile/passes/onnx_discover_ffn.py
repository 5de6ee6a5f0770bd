"""Structural FFN discovery on an ONNX graph (onnx_ir), the ONNX twin of ``discover_ffn``.

A team that only has ONNX files (``torch.onnx.export`` of a Hugging Face model, with or
without ifp-compile's masks) must be able to specialise them, so discovery cannot rely
on anything torch left behind. It uses the same definition of a block as the aten pass:

    projection(s) of x into width w  ->  a region of pointwise ops  ->  projection back

* a *projection* is ``MatMul(x, W)`` or ``Gemm(x, W[, C])`` whose weight is a 2-D
  initializer, directly or through ``Transpose(perm=[1, 0])`` (the exporter folds the
  transposes of ``nn.Linear`` weights, so it usually stores ``W`` as ``[in, out]``); an
  ``Add`` of a 1-D initializer right after it is its bias;
* the *region* is everything between the projections: pointwise ops (SiLU appears as
  ``x * Sigmoid(x)``, tanh-GELU as its polynomial, or ``Gelu``), ``Reshape`` that keeps
  the last axis, ``Split`` of a fused gate+up projection along the last axis, and the
  ``h * m`` multiply with a mask graph input of shape ``[w]`` that a masked export has;
* every value of the region is read only inside the block, so slicing cannot change
  anything else; constants in it are scalars (a per-channel constant would need slicing
  this pass does not know how to justify).

Blocks are described by value names, so a description stays valid for a clone of the
graph (``onnx_specialize`` edits a clone and never the caller's model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..errors import NoFFNFoundError, ProgramError

POINTWISE = frozenset({
    "Mul", "Add", "Sub", "Div", "Pow", "Sigmoid", "Tanh", "Erf", "Relu", "Gelu", "Neg", "Exp",
    "Softplus", "Identity", "Cast", "Sqrt", "Abs", "Clip", "HardSigmoid", "HardSwish", "Max", "Min",
})
PATTERNS_TRIED = (
    "MatMul/Gemm with an initializer weight (optionally Transpose'd, optionally + 1-D bias) "
    "-> pointwise ops (Sigmoid*x, Gelu, Erf/Tanh GELU, Relu, gate*up Mul, mask Mul), Reshape "
    "keeping the last axis, or Split of a fused gate_up -> MatMul/Gemm back"
)


@dataclass(frozen=True)
class OnnxParam:
    """An initializer with the block's intermediate axis (see ``blocks.ParamSlice``)."""

    name: str  # initializer name
    role: str  # "up", "up_bias", "down"
    axis: int
    offsets: tuple[int, ...] = (0,)
    shape: tuple[int, ...] = ()
    reader: str = ""  # output name of the node that reads it (MatMul/Gemm/Add/Transpose)


@dataclass(frozen=True)
class OnnxFFNBlock:
    index: int
    name: str
    width: int
    activation: str
    gated: bool
    fused_gate_up: bool
    params: tuple[OnnxParam, ...]
    down_bias: str | None  # initializer name, kept as is
    down_output: str  # value name of the block's output (after the down bias, if any)
    input: str  # x, the value projected into width w
    region: tuple[str, ...]  # first-output names of the nodes carrying width w, in graph order
    widened: tuple[str, ...]  # names of every value whose last axis is w (or n*w) to resize
    reshapes: tuple[str, ...] = ()  # first-output names of Reshape nodes whose shape mentions w
    splits: tuple[str, ...] = ()  # first-output names of Split nodes of a fused projection
    mask_input: str | None = None  # graph input m of a masked export
    mask_output: str | None = None  # output of the h * m node
    shared_params: tuple[str, ...] = field(default=())

    def params_per_channel(self) -> int:
        total = 0
        for p in self.params:
            numel = int(np.prod(p.shape)) if p.shape else 1
            total += numel // p.shape[p.axis] * len(p.offsets)
        return total

    def describe(self) -> str:
        kind = "gated" if self.gated else "plain"
        if self.fused_gate_up:
            kind += ", fused gate_up"
        masked = ", masked" if self.mask_input else ""
        return f"[{self.index}] {self.name}: width {self.width}, {self.activation}, {kind}{masked}"


class _NotABlock(Exception):
    pass


def _const(v: ir.Value | None):
    return None if v is None else v.const_value


def _weight(v: ir.Value):
    """(initializer value, reader value, transposed) when ``v`` is a 2-D constant weight."""
    if v is None:
        return None
    t = _const(v)
    if t is not None and len(t.shape) == 2 and v.is_initializer():
        return v, v, False
    p = v.producer()
    if p is not None and p.op_type == "Transpose" and p.domain in ("", "ai.onnx"):
        perm = p.attributes.get("perm")
        src = p.inputs[0]
        ts = _const(src)
        if ts is not None and len(ts.shape) == 2 and src.is_initializer() and (perm is None or list(perm.value) == [1, 0]):
            return src, v, True
    return None


@dataclass
class _Proj:
    node: ir.Node
    weight: ir.Value
    in_axis: int
    out_axis: int
    out_width: int
    bias: ir.Value | None
    output: ir.Value  # after the bias
    reader: ir.Value  # the value the MatMul/Gemm reads the weight through


def _projection(node: ir.Node | None, with_bias: bool = True) -> _Proj | None:
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        w = _weight(node.inputs[1])
        if w is None:
            return None
        init, reader, transposed = w
        in_axis, out_axis = (1, 0) if transposed else (0, 1)
        bias = None
    elif node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return None
        w = _weight(node.inputs[1])
        if w is None:
            return None
        init, reader, transposed = w
        trans_b = bool(node.attributes.get_int("transB", 0)) != transposed
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        if node.attributes.get_float("alpha", 1.0) != 1.0:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and (_const(bias) is None or node.attributes.get_float("beta", 1.0) != 1.0):
            return None
    else:
        return None
    width = int(_const(init).shape[out_axis])
    if bias is not None and tuple(_const(bias).shape) not in ((width,), (1, width)):
        return None
    out = node.outputs[0]
    if with_bias and bias is None:
        uses = list(out.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add" and not out.is_graph_output():
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx]
            t = _const(other)
            if t is not None and other.is_initializer() and tuple(t.shape) == (width,):
                bias, out = other, add.outputs[0]
    return _Proj(node, init, in_axis, out_axis, width, bias, out, reader)


def _projection_of_output(v: ir.Value) -> _Proj | None:
    """The projection whose (biased) output is ``v``."""
    p = v.producer()
    if p is None:
        return None
    proj = _projection(p)
    if proj is not None and proj.output is v:
        return proj
    if p.op_type == "Add":  # v = MatMul(x, W) + b
        for inp in p.inputs:
            q = inp.producer() if inp is not None else None
            proj = _projection(q)
            if proj is not None and proj.output is v:
                return proj
    return None


def _last_dim_is(v: ir.Value, n: int) -> bool:
    shape = v.shape
    if shape is None or len(shape) == 0:
        return True  # unknown: trust the weights' widths
    last = shape[len(shape) - 1]
    return not isinstance(last, int) or last == n


def _is_mask_shape(v: ir.Value, w: int) -> bool:
    shape = v.shape
    return shape is not None and len(shape) == 1 and shape[0] == w


class _Walk:
    """Backward walk from the down projection's input to the up projections."""

    def __init__(self, down: _Proj):
        self.down = down
        self.w = int(_const(down.weight).shape[down.in_axis])
        self.region: list[ir.Node] = []
        self.ups: list[tuple[_Proj, tuple[int, ...]]] = []
        self.splits: list[ir.Node] = []
        self.reshapes: list[ir.Node] = []
        self.mask_input: ir.Value | None = None
        self.mask_cast: ir.Node | None = None
        self.mask_node: ir.Node | None = None
        self.values: list[ir.Value] = []  # values whose last axis is w

    def run(self) -> None:
        stack = [self.down.node.inputs[0]]
        seen: set[int] = set()
        while stack:
            v = stack.pop()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            self._visit(v, stack)
        if not self.ups:
            raise _NotABlock("no projection into the intermediate width")
        self._check_closed()

    def _visit(self, v: ir.Value, stack: list) -> None:
        t = _const(v)
        if t is not None:
            if int(np.prod(t.shape)) != 1:
                raise _NotABlock(f"non-scalar constant {v.name} in the region")
            return
        if v.is_graph_input():
            if self.mask_input is None and _is_mask_shape(v, self.w):
                self.mask_input = v
                return
            raise _NotABlock(f"graph input {v.name} reaches the region")
        proj = _projection_of_output(v)
        if proj is not None:
            if proj.out_width != self.w:
                raise _NotABlock(f"projection {v.name} has width {proj.out_width}, not {self.w}")
            self.ups.append((proj, (0,)))
            self.values.append(v)
            return
        p = v.producer()
        if p is None:
            raise _NotABlock(f"{v.name} has no producer")
        if (p.op_type == "Cast" and self.mask_input is None and p.inputs[0] is not None
                and p.inputs[0].is_graph_input() and _is_mask_shape(p.inputs[0], self.w)):
            self.mask_input, self.mask_cast = p.inputs[0], p  # a float32 mask cast to a bf16/fp16 h
            return
        if p.op_type == "Split" and p.domain in ("", "ai.onnx"):
            self._visit_split(p, v)
            return
        if not _last_dim_is(v, self.w):
            raise _NotABlock(f"{v.name} does not have width {self.w}")
        if p.op_type in POINTWISE and p.domain in ("", "ai.onnx"):
            self.region.append(p)
            self.values.append(v)
            stack.extend(p.inputs)
            return
        if p.op_type == "Reshape":
            self.region.append(p)
            self.reshapes.append(p)
            self.values.append(v)
            stack.append(p.inputs[0])
            return
        raise _NotABlock(f"{p.op_type} ({v.name}) in the region")

    def _visit_split(self, split: ir.Node, v: ir.Value) -> None:
        src = split.inputs[0]
        proj = _projection_of_output(src)
        n = len(split.outputs)
        if proj is None or proj.out_width != n * self.w:
            raise _NotABlock(f"Split {v.name} does not split a projection of width {n} x {self.w}")
        axis = split.attributes.get_int("axis", 0)
        rank = len(src.shape) if src.shape is not None else None
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            raise _NotABlock(f"Split {v.name} is not along the last axis")
        if len(split.inputs) > 1 and split.inputs[1] is not None:
            sizes = _const(split.inputs[1])
            if sizes is None or list(sizes.numpy().reshape(-1)) != [self.w] * n:
                raise _NotABlock(f"Split {v.name} has sizes other than {n} x {self.w}")
        if split not in self.splits:
            self.splits.append(split)
            self.values.append(src)
            self.ups.append((proj, tuple(i * self.w for i in range(n))))
        self.values.append(v)

    def _check_closed(self) -> None:
        """Every value of the block is read only by the block (else slicing leaks)."""
        inside = {id(n) for n in self.region} | {id(self.down.node)} | {id(s) for s in self.splits}
        for proj, _ in self.ups:
            if proj.output is not proj.node.outputs[0]:
                inside.add(id(proj.output.producer()))
        for v in self.values:
            if v.is_graph_output():
                raise _NotABlock(f"{v.name} is a graph output")
            for use in v.uses():
                if id(use.node) not in inside:
                    raise _NotABlock(f"{v.name} is also read by {use.node.op_type} outside the block")
        if self.mask_input is not None:
            operand = self.mask_input
            if self.mask_cast is not None:
                uses = list(operand.uses())
                if len(uses) != 1 or uses[0].node is not self.mask_cast:
                    raise _NotABlock(f"mask input {operand.name} is read by more than its Cast")
                operand = self.mask_cast.outputs[0]
            uses = list(operand.uses())
            if len(uses) != 1 or uses[0].node.op_type != "Mul":
                raise _NotABlock(f"mask input {self.mask_input.name} is read by more than one Mul")
            self.mask_node = uses[0].node


def _activation(region: list[ir.Node]) -> str:
    ops = {n.op_type for n in region}
    for n in region:
        if n.op_type == "Gelu":
            approx = n.attributes.get_string("approximate", "none")
            return "gelu_tanh" if approx == "tanh" else "gelu"
    if "Erf" in ops:
        return "gelu"
    if "Tanh" in ops:
        return "gelu_tanh"
    if "Sigmoid" in ops:
        return "silu"
    if "Relu" in ops:
        return "relu"
    return "pointwise(" + ",".join(sorted(ops)) + ")"


def _readers(init: ir.Value) -> set[int]:
    out = set()
    for use in init.uses():
        out.add(id(use.node))
        if use.node.op_type == "Transpose":
            out |= {id(u.node) for u in use.node.outputs[0].uses()}
    return out


def _block(walk: _Walk, index: int, order: dict[int, int]) -> OnnxFFNBlock:
    down = walk.down
    params: list[OnnxParam] = []
    block_nodes = {id(n) for n in walk.region} | {id(down.node)}
    for proj, offsets in walk.ups:
        block_nodes.add(id(proj.node))
        if proj.output is not proj.node.outputs[0]:
            block_nodes.add(id(proj.output.producer()))
    for proj, offsets in walk.ups:
        role = "gate_up" if len(offsets) > 1 else "up"
        t = _const(proj.weight)
        params.append(OnnxParam(proj.weight.name, role, proj.out_axis, offsets, tuple(t.shape), proj.reader.name))
        if proj.bias is not None:
            b = _const(proj.bias)
            params.append(OnnxParam(proj.bias.name, role + "_bias", len(b.shape) - 1, offsets, tuple(b.shape),
                                    proj.bias.name))
    t = _const(down.weight)
    params.append(OnnxParam(down.weight.name, "down", down.in_axis, (0,), tuple(t.shape), down.reader.name))
    shared = []
    for p in params:
        v = _find_initializer(down.node.graph, p.name)
        if not _readers(v) <= block_nodes or v.is_graph_output():
            shared.append(p.name)
    gated = len(walk.ups) > 1 or any(len(o) > 1 for _, o in walk.ups)
    region = sorted(walk.region, key=lambda n: order[id(n)])
    widened = []
    seen = set()
    for v in walk.values + [o for n in walk.region for o in n.outputs]:
        if v.name not in seen:
            seen.add(v.name)
            widened.append(v.name)
    for proj, _ in walk.ups:
        for v in (proj.node.outputs[0], proj.output):
            if v.name not in seen:
                seen.add(v.name)
                widened.append(v.name)
    hidden_mask = walk.mask_node.outputs[0].name if walk.mask_node is not None else None
    return OnnxFFNBlock(
        index=index,
        name=f"ffn.{index}",
        width=walk.w,
        activation=_activation(walk.region),
        gated=gated,
        fused_gate_up=any(len(o) > 1 for _, o in walk.ups),
        params=tuple(params),
        down_bias=down.bias.name if down.bias is not None else None,
        down_output=down.output.name,
        input=walk.ups[0][0].node.inputs[0].name,
        region=tuple(n.outputs[0].name for n in region),
        widened=tuple(widened),
        reshapes=tuple(n.outputs[0].name for n in walk.reshapes),
        splits=tuple(n.outputs[0].name for n in walk.splits),
        mask_input=walk.mask_input.name if walk.mask_input is not None else None,
        mask_output=hidden_mask,
        shared_params=tuple(shared),
    )


def _find_initializer(graph: ir.Graph, name: str) -> ir.Value:
    v = graph.initializers.get(name)
    if v is None:
        raise ProgramError(f"initializer {name} not found in the ONNX graph")
    return v


def _as_ir(model) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    import onnx

    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    raise ProgramError(f"expected an onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")


def find_onnx_ffn_blocks(model, *, require: bool = True) -> list[OnnxFFNBlock]:
    """Every FFN block of an ONNX model (``onnx.ModelProto`` or ``onnx_ir.Model``), in graph order."""
    graph = _as_ir(model).graph
    order = {id(n): i for i, n in enumerate(graph)}
    blocks: list[OnnxFFNBlock] = []
    for node in graph:
        down = _projection(node)
        if down is None:
            continue
        walk = _Walk(down)
        try:
            walk.run()
        except _NotABlock:
            continue
        blocks.append(_block(walk, len(blocks), order))
    if require and not blocks:
        raise NoFFNFoundError(
            f"no FFN block found in the ONNX graph ({len(order)} nodes). Patterns tried: {PATTERNS_TRIED}"
        )
    return blocks
