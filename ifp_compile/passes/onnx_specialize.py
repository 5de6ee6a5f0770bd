"""Specialisation of an ONNX model to one mask, on the onnx_ir graph.

The same partial evaluation as ``passes/specialize.py``, done where a build system's
artifacts live: initializers are sliced directly (no ``Gather`` is left in the graph),
non-binary mask values are multiplied into the kept columns of ``W_down``, width
literals (``Reshape`` shapes, ``Split`` sizes) are rewritten, the ``h * m`` multiplies
and the mask graph inputs are deleted, and value shapes are updated so the result
passes ``onnx.checker.check_model(full_check=True)`` and shape inference.

Why a second pass instead of re-exporting the specialised ExportedProgram: a task must
cost what writing its FFN weights costs. ``torch.onnx.export`` of SmolLM2 takes tens of
seconds per task; this pass clones the graph (tensors shared) and slices.

The caller's model is never modified: the pass works on ``Graph.clone()``, which shares
the initializer tensors, and replaces (never mutates) the ones it slices. Initializers
read outside a block get a private sliced copy named ``<name>_ifp_ffn<i>``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..errors import ProgramError
from ..masks import validate_masks
from ..slicing import kept_channels, take_array
from .onnx_discover_ffn import OnnxFFNBlock, _as_ir, find_onnx_ffn_blocks


def clone_model(model: ir.Model) -> ir.Model:
    return ir.Model(
        model.graph.clone(),
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        producer_version=model.producer_version,
        domain=model.domain,
        model_version=model.model_version,
        doc_string=model.doc_string,
        functions=list(model.functions.values()),
        metadata_props=dict(model.metadata_props),
    )


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    out: dict[str, ir.Value] = {}
    for v in graph.inputs:
        out[v.name] = v
    for name, v in graph.initializers.items():
        out[name] = v
    for n in graph:
        for o in n.outputs:
            out[o.name] = o
    return out


def _resize_last(v: ir.Value, w: int, k: int) -> None:
    shape = v.shape
    if shape is None or len(shape) == 0:
        return
    dims = list(shape.dims)
    last = dims[-1]
    if isinstance(last, int) and last % w == 0:
        dims[-1] = last // w * k
        v.shape = ir.Shape(dims)


class _OnnxFolder:
    def __init__(self, model: ir.Model):
        self.model = clone_model(model)
        self.graph = self.model.graph
        self.values = _values_by_name(self.graph)
        self.masks_removed: list[ir.Value] = []
        # new initializer -> how it was cut from the base: (base name, axis, offsets, role, block)
        self.slices: dict[str, tuple] = {}

    def _unique_value_name(self, name: str) -> str:
        base, i = name, 0
        while name in self.graph.initializers or name in self.values:
            i += 1
            name = f"{base}_{i}"
        return name

    def _new_initializer(self, name: str, value) -> ir.Value:
        """A new initializer holding ``value``: a numpy array, or a tensor (lazy ones included)."""
        name = self._unique_value_name(name)
        tensor = ir.Tensor(value, name=name) if isinstance(value, np.ndarray) else value
        v = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(v)
        self.values[name] = v
        return v

    def _replace_param(self, block: OnnxFFNBlock, p, tensor) -> None:
        """Point the block's reader of ``p`` at a new initializer holding ``tensor``."""
        old = self.values[p.name]
        new = self._new_initializer(f"{p.name}_ifp_ffn{block.index}", tensor)
        self.slices[new.name] = (p.name, p.axis, [int(o) for o in p.offsets], p.role, block.index)
        reader_value = self.values[p.reader]
        if reader_value is old:  # read directly by MatMul/Gemm/Add: rewire the block's uses
            block_outputs = set(block.widened) | {block.down_output} | set(block.region)
            down_node = self._down_node(block)
            for use in list(old.uses()):
                node = use.node
                if node is down_node or any(o.name in block_outputs for o in node.outputs):
                    node.replace_input_with(use.idx, new)
        else:  # read through a Transpose: rewire the Transpose, resize its output
            transpose = reader_value.producer()
            if len(list(old.uses())) > 1:  # the Transpose's input is shared: give the block its own
                raise ProgramError(
                    f"FFN block {block.index}: weight {p.name} is transposed once and read elsewhere; not supported"
                )
            transpose.replace_input_with(0, new)
            reader_value.shape = ir.Shape(tuple(reversed(tuple(tensor.shape))))
            if reader_value.type is None:  # the exporter gave it a shape only: a shape needs a type to be saved
                reader_value.type = ir.TensorType(tensor.dtype)

    def _down_node(self, block: OnnxFFNBlock) -> ir.Node:
        down_param = next(p for p in block.params if p.role == "down")
        reader = self.values[down_param.reader]
        for use in reader.uses():
            if use.node.op_type in ("MatMul", "Gemm"):
                return use.node
        raise ProgramError(f"FFN block {block.index}: down projection not found")

    def fold(self, block: OnnxFFNBlock, mask: np.ndarray) -> None:
        keep, scale = kept_channels(mask)
        w, k = block.width, int(keep.size)
        if k == 0:
            self._remove(block)
            return
        for p in block.params:
            idx = np.concatenate([keep + o for o in p.offsets])
            self._replace_param(block, p, _sliced(self.values[p.name].const_value, p.axis, idx,
                                                  scale if p.role == "down" else None))
        for name in block.reshapes:
            self._rewrite_reshape(block, self.values[name].producer(), w, k)
        for name in block.splits:
            split = self.values[name].producer()
            if len(split.inputs) > 1 and split.inputs[1] is not None:
                n = len(split.outputs)
                split.replace_input_with(1, self._new_initializer(f"split_sizes_ifp_ffn{block.index}",
                                                                  np.array([k] * n, dtype=np.int64)))
        for name in block.widened:
            _resize_last(self.values[name], w, k)
        if block.mask_output is not None:
            self._drop_mask(block)

    def _rewrite_reshape(self, block: OnnxFFNBlock, node: ir.Node, w: int, k: int) -> None:
        shape_v = node.inputs[1]
        t = shape_v.const_value
        if t is not None:
            shape = t.numpy().astype(np.int64).copy()
            if shape.size and shape[-1] > 0 and shape[-1] % w == 0:
                shape[-1] = shape[-1] // w * k
                node.replace_input_with(1, self._new_initializer(f"{shape_v.name}_ifp_ffn{block.index}", shape))
            return
        p = shape_v.producer()
        if p is not None and p.op_type == "Concat" and p.inputs and p.inputs[-1] is not None:
            last = p.inputs[-1].const_value
            if last is not None and last.numpy().size == 1:
                val = int(last.numpy().reshape(-1)[0])
                if val > 0 and val % w == 0:
                    arr = np.array([val // w * k], dtype=last.numpy().dtype).reshape(last.numpy().shape)
                    new_last = self._new_initializer(f"{p.inputs[-1].name}_ifp_ffn{block.index}", arr)
                    if len(list(shape_v.uses())) > 1:
                        # the shape also feeds other Reshapes (CSE merges equal shape computations,
                        # across blocks too): this Reshape gets its own Concat
                        name = self._unique_value_name(f"{shape_v.name}_ifp_ffn{block.index}")
                        clone = ir.Node(p.domain, "Concat", [*p.inputs[:-1], new_last], p.attributes.values(),
                                        num_outputs=1, name=name)
                        clone.outputs[0].name = name
                        self.values[name] = clone.outputs[0]
                        clone.outputs[0].shape, clone.outputs[0].type = shape_v.shape, shape_v.type
                        self.graph.insert_before(node, clone)
                        node.replace_input_with(1, clone.outputs[0])
                    else:
                        p.replace_input_with(len(p.inputs) - 1, new_last)
                return
            if last is not None:
                return
        raise ProgramError(
            f"FFN block {block.index}: cannot rewrite the width in the shape of Reshape {node.outputs[0].name} "
            "(its shape is neither a constant nor Concat(..., constant))"
        )

    def _drop_mask(self, block: OnnxFFNBlock) -> None:
        out = self.values[block.mask_output]
        node = out.producer()
        m = self.values[block.mask_input]

        def is_mask(v):  # the mask input, or its Cast to h's dtype (bf16/fp16 models)
            p = v.producer()
            return v is m or (p is not None and p.op_type == "Cast" and p.inputs[0] is m)

        hidden = node.inputs[1] if is_mask(node.inputs[0]) else node.inputs[0]
        out.replace_all_uses_with(hidden)
        self.graph.remove(node, safe=True)
        self.masks_removed.append(m)

    def _remove(self, block: OnnxFFNBlock) -> None:
        """No channel kept: the block's output is ``zeros(shape(x)) (+ b_down)``."""
        out = self.values[block.down_output]
        x = self.values[block.input]
        if out.shape is not None and x.shape is not None and list(out.shape.dims) != list(x.shape.dims):
            raise ProgramError(
                f"FFN block {block.index}: cannot drop every channel, its output shape {out.shape} "
                f"differs from its input shape {x.shape}"
            )
        dtype = self.values[next(p for p in block.params if p.role == "down").name].const_value.dtype
        anchor = out.producer()
        shape = ir.node("Shape", [x])
        zeros = ir.node("ConstantOfShape", [shape.outputs[0]],
                        attributes={"value": ir.tensor(np.zeros(1, dtype=dtype.numpy()))})
        nodes = [shape, zeros]
        result = zeros.outputs[0]
        if block.down_bias is not None:
            add = ir.node("Add", [result, self.values[block.down_bias]])
            nodes.append(add)
            result = add.outputs[0]
        for i, n in enumerate(nodes):
            for j, o in enumerate(n.outputs):
                o.name = f"{block.down_output}_ifp_zero{i}_{j}"
            n.name = f"ifp_zero_ffn{block.index}_{i}"
        self.graph.insert_before(anchor, nodes)
        result.shape, result.type = out.shape, out.type
        out.replace_all_uses_with(result)
        if out.is_graph_output():
            raise ProgramError(f"FFN block {block.index}: its output is a graph output")
        if block.mask_input is not None:
            self.masks_removed.append(self.values[block.mask_input])

    def finish(self) -> ir.Model:
        _eliminate_dead_code(self.graph)
        for m in self.masks_removed:
            if list(m.uses()):
                raise ProgramError(f"internal: mask input {m.name} still has users")
            self.graph.inputs.remove(m)
        for name, v in list(self.graph.initializers.items()):
            if not list(v.uses()) and not v.is_graph_output():
                del self.graph.initializers[name]
        return self.model


def _sliced(source, axis: int, index: np.ndarray, scale: np.ndarray | None) -> ir.LazyTensor:
    """``take_array(source, axis, index, scale)``, computed when the tensor is written or read.

    Lazy so that a task holds no sliced weight in memory before it is written: the writer
    produces one at a time (the base's weights are read from disk, see ``build._load_base``).
    """
    shape = list(source.shape.numpy())
    shape[axis] = int(index.size)
    return ir.LazyTensor(lambda: ir.Tensor(take_array(source.numpy(), axis, index, scale), dtype=source.dtype),
                         dtype=source.dtype, shape=ir.Shape(shape))


def _eliminate_dead_code(graph: ir.Graph) -> None:
    outputs = {id(v) for v in graph.outputs}
    for node in reversed(list(graph)):
        if any(list(o.uses()) or id(o) in outputs for o in node.outputs):
            continue
        graph.remove(node, safe=True)


def specialize_onnx(model, mask):
    """A smaller dense ONNX model equal to ``model`` evaluated with ``mask``.

    ``model`` is an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (the result has the same
    type), exported with or without ifp-compile's mask inputs; ``mask`` is a list with
    one 1-D tensor (torch or numpy) per FFN block, in graph order. Masked exports lose
    their ``ffn_masks_*`` inputs; the caller's model is not modified.
    """
    proto_in = not isinstance(model, ir.Model)
    out, _ = specialize_onnx_with_slices(_as_ir(model), mask)
    return ir.to_proto(out) if proto_in else out


def specialize_onnx_with_slices(model: ir.Model, mask) -> tuple[ir.Model, dict[str, tuple]]:
    """``specialize_onnx`` of an ``onnx_ir.Model``, and how each new weight was cut from the
    base: ``{initializer: (base initializer, axis, offsets, role, block index)}``.

    The second part is what lets a build write the next task of the same widths without
    running this pass (``shared_graphs``): its graph is the same, only these slices differ.
    """
    import torch

    blocks = find_onnx_ffn_blocks(model)
    if isinstance(mask, (list, tuple)):
        mask = [torch.from_numpy(np.asarray(m)) if isinstance(m, np.ndarray) else m for m in mask]
    masks = validate_masks(mask, blocks)
    folder = _OnnxFolder(model)
    for block, m in zip(blocks, masks):
        folder.fold(block, m.numpy())
    out = folder.finish()
    return out, {name: s for name, s in folder.slices.items() if name in out.graph.initializers}


__all__ = ["specialize_onnx", "specialize_onnx_with_slices"]
