"""Specialisation = partial evaluation of the masked program on a concrete mask.

For a block with intermediate activation ``h(x)`` and mask ``m``, let ``S`` be the
kept channels (``m_c != 0``). Then

    W_down (m * h(x)) = W_down[:, S] diag(m_S) h_S(x)

and ``h_S`` uses only rows ``S`` of the gate/up weights and biases (and entries ``S`` of
any per-channel parameter in the pointwise region), because every op between the
projections is pointwise along the intermediate axis. That one line is the proof
obligation the property tests check. So the pass

1. evaluates the predictor branch alone on the instruction (it does not depend on
   the model's inputs) when given an instruction, giving concrete masks;
2. index-selects the kept channels of every tensor on the intermediate axis (with
   ``offsets`` for fused gate+up weights), multiplies non-binary mask values into the
   kept columns of ``W_down``, and rewrites width literals (``view`` sizes, ``split``
   sizes) in the region;
3. deletes the mask multiplies, the mask inputs and the predictor branch; a block with
   no kept channel is replaced by ``zeros_like(x) (+ b_down)``;
4. refreshes ``meta["val"]`` of every node it touched and rebuilds the program
   (``program_edit.rebuild_program`` checks metadata and validates).

Parameters that are not sliced are shared with the source program, never copied; the
source program is never modified.
"""

from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from ..blocks import AttentionBlock, FFNBlock, HeadSlice, ParamSlice
from ..errors import InstructionError, MaskError, ProgramError
from ..graph_utils import (
    HEAD_MASK_PREFIX,
    INSTRUCTION_INPUT,
    backward_closure,
    mask_branch,
    input_specs_by_node,
    state_tensor,
    user_input_nodes,
)
from ..masks import instruction_ids, validate_masks
from ..slicing import take
from ..weights.lazy import keep_recipe
from ..weights.stream import StreamingInterpreter
from .discover_attention import attention_report, find_attention_blocks
from .discover_ffn import VIEW_OPS, find_ffn_blocks
from .program_edit import copy_graph, eliminate_dead_code, fake_mode_of, node_by_name, rebuild_program

aten = torch.ops.aten


# --------------------------------------------------------------------------------------
# 1. the predictor branch
# --------------------------------------------------------------------------------------
def _check_vocabulary(program: ExportedProgram, instruction: Node, ids: torch.Tensor) -> None:
    """Refuse ids beyond the predictor's embedding table (a tokenizer mismatch) with a
    clear error instead of an index error from inside the embedding kernel."""
    for user in instruction.users:
        if user.target is torch.ops.aten.embedding.default and user.args[1] is instruction:
            rows = user.args[0].meta["val"].shape[0]
            top, low = int(ids.max()), int(ids.min())
            if top >= rows or low < 0:
                bad = top if top >= rows else low
                raise InstructionError(
                    f"instruction token id {bad} is outside the predictor's vocabulary (embedding of {rows} rows): "
                    "was the instruction tokenized with another model's tokenizer?"
                )


def predict_masks(program: ExportedProgram, blocks: list[FFNBlock], ids: torch.Tensor) -> list[torch.Tensor]:
    """Evaluate only the predictor branch of ``program`` on ``ids``."""
    nodes = node_by_name(program.graph)
    sources = [nodes[b.mask_source] for b in blocks if b.mask_source is not None]
    if len(sources) != len(blocks):
        raise InstructionError("the program's masks do not all come from its predictor branch")
    needed = backward_closure(sources)
    specs = input_specs_by_node(program)
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {}
    inputs = []
    for n in program.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            spec = specs[n.name]
            if spec.kind == InputKind.USER_INPUT:
                if n.name != INSTRUCTION_INPUT:
                    raise ProgramError(f"the predictor branch reads the model input {n.name}")
                _check_vocabulary(program, n, ids)
                inputs.append(ids)
            else:
                inputs.append(state_tensor(program, spec))
            env[n] = graph.placeholder(n.name)
        else:
            env[n] = graph.node_copy(n, env.__getitem__)
    graph.output([env[s] for s in sources])
    branch = GraphModule(program.graph_module, graph)
    with torch.no_grad():
        if any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in inputs):
            # a weightless program: its weights are read node by node (weights.stream)
            return [m.detach() for m in StreamingInterpreter(branch).run(*inputs)]
        return [m.detach() for m in branch(*inputs)]


# --------------------------------------------------------------------------------------
# 2-3. folding one block
# --------------------------------------------------------------------------------------
def _kept_index(ps, keep: torch.Tensor) -> torch.Tensor:
    return keep if ps.offsets == (0,) else torch.cat([keep + o for o in ps.offsets])


PROJECTION_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)
_INT_MAX = 2**63 - 1


def _region_names(block) -> list[str]:
    return list(block.region) if isinstance(block, FFNBlock) else [name for name, _ in block.region]


def _rewrite_head_literals(n: Node, axis: int, kv: int, k: int) -> None:
    """Sizes written into the graph on the head axis go from ``kv`` groups to ``k``.

    Every size on that axis is a multiple of the group count (heads, kv heads, their
    features, a fused q/k/v's parts and boundaries), so each scales by ``k / kv``.
    """

    def scaled(s):
        if not isinstance(s, int) or s <= 0 or s >= _INT_MAX:
            return s
        if s % kv:
            raise ProgramError(f"internal: size {s} of {n.name} on the head axis is not a multiple of {kv} groups")
        return s // kv * k

    t, args = n.target, list(n.args)
    if t in VIEW_OPS or t is aten.expand.default:
        shape = list(args[1])
        if axis < len(shape):
            shape[axis] = scaled(shape[axis])
        args[1] = shape
    elif t is aten.slice.Tensor and len(args) > 1 and args[1] % n.meta["val"].dim() == axis:
        args[2:4] = [scaled(a) for a in args[2:4]]
    elif t is aten.split.Tensor and (args[2] if len(args) > 2 else 0) % len(n.args[0].meta["val"].shape) == axis:
        args[1] = scaled(args[1])
    elif t is aten.split_with_sizes.default:
        args[1] = [scaled(a) for a in args[1]]
    n.args = tuple(args)


class _Folder:
    def __init__(self, program: ExportedProgram):
        self.program = program
        self.graph = copy_graph(program)
        self.nodes = node_by_name(self.graph)
        self.specs = input_specs_by_node(program)
        self.state_dict = dict(program.state_dict)
        self.constants = dict(program.constants)
        self.new_specs: dict[str, InputSpec] = {}
        self.branch = {n.name for n in mask_branch(program)}  # deleted wholesale at the end
        self.fake_mode = fake_mode_of(self.graph)
        self._resized: dict[tuple, torch.Tensor] = {}
        # parameter -> how it was cut from the source's: (source key, axis, offsets, role, block)
        self.slices: dict[str, tuple] = {}

    def _fake(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``meta["val"]`` for a new parameter ``t`` that replaces one whose value was ``like``.

        A weightless parameter lives on the meta device, but the graph computes on ``like``'s
        device: its value in the graph is a fake tensor there, as export made it.
        """
        if t.device.type == "meta":
            with self.fake_mode:
                return torch.empty(t.shape, dtype=t.dtype, device=like.device)
        return self.fake_mode.from_tensor(t, static_shapes=True)

    def _set_tensor(self, key: str, spec: InputSpec, value: torch.Tensor) -> None:
        if spec.kind == InputKind.CONSTANT_TENSOR or key in self.constants:
            self.constants[key] = value
        elif spec.kind == InputKind.PARAMETER:
            source = self.program.state_dict.get(key)
            requires_grad = source.requires_grad if source is not None else False
            self.state_dict[key] = keep_recipe(value, torch.nn.Parameter(value, requires_grad=requires_grad))
        else:
            self.state_dict[key] = value

    def _private_placeholder(self, block: FFNBlock, ph: Node, key: str, owners: set[Node]) -> Node:
        """A new parameter placeholder for a shared tensor; only the block's nodes read it."""
        new_key = f"{key}_ifp_ffn{block.index}"
        name = new_key.replace(".", "_")
        params = [n for n in self.graph.nodes if n.op == "placeholder"
                  and self.specs.get(n.name, None) is not None and self.specs[n.name].kind == InputKind.PARAMETER]
        anchor = params[-1] if params else next(n for n in self.graph.nodes if n.op == "placeholder")
        with self.graph.inserting_after(anchor):
            new = self.graph.placeholder(name)
        new.meta = dict(ph.meta)
        for user in list(ph.users):
            if user in owners:
                user.replace_input_with(ph, new)
        self.new_specs[new.name] = InputSpec(
            kind=InputKind.PARAMETER, arg=TensorArgument(name=new.name), target=new_key, persistent=None
        )
        self.specs[new.name] = self.new_specs[new.name]
        return new

    def _slice_params(self, block, keep: torch.Tensor, scale: torch.Tensor | None, scaled_role: str) -> None:
        """Keep ``keep`` (channels or head groups) in every tensor of ``block``; fold ``scale``
        into the tensor whose role is ``scaled_role`` (W_down, or W_o for heads)."""
        owners = {self.nodes[r] for r in _region_names(block)}
        owners.add(self.nodes[block.down_node if isinstance(block, FFNBlock) else block.o_node])
        for ps in block.params:
            ph = self.nodes[ps.placeholder]
            spec = self.specs[ps.placeholder]
            source = state_tensor(self.program, spec)
            idx = _kept_index(ps, keep) if isinstance(ps, ParamSlice) else ps.index(keep)
            if (scale is None or ps.role != scaled_role) and idx.numel() == source.shape[ps.axis] and bool(
                    (idx == torch.arange(idx.numel())).all()):
                continue  # everything kept, unscaled: the source's tensor, shared, not a copy
            source_key = spec.target
            if ps.key in block.shared_params:
                ph = self._private_placeholder(block, ph, ps.key, owners)
                spec = self.specs[ph.name]
            folded = scale if ps.role == scaled_role else None
            if folded is not None and isinstance(ps, HeadSlice):  # one value per group, over its positions
                folded = torch.cat([folded.repeat_interleave(size) for _, size in ps.segments])
            sliced = take(source, ps.axis, idx, folded)
            self._set_tensor(spec.target, spec, sliced)
            if isinstance(ps, ParamSlice):
                self.slices[spec.target] = (source_key, ps.axis, [int(o) for o in ps.offsets], ps.role, block.index)
            ph.meta["val"] = self._fake(sliced, ph.meta["val"])

    def _drop_mask_node(self, block) -> None:
        """``h * m`` -> ``h``: the mask now lives in the weights."""
        if block.mask_node is None:
            return
        mnode = self.nodes.pop(block.mask_node)
        hidden = self.nodes[block.hidden_node if isinstance(block, FFNBlock) else block.o_input]
        mnode.replace_all_uses_with(hidden)
        self.graph.erase_node(mnode)

    @torch.no_grad()
    def fold(self, block: FFNBlock, mask: torch.Tensor) -> None:
        keep = torch.nonzero(mask).flatten()
        if keep.numel() == 0:
            down = self.nodes[block.down_node]
            x = self._projection_input(block)
            bias = None if block.down_bias is None else down.args[0] if down.target is aten.addmm.default else down.args[2]
            self._zeros_instead(f"FFN block {block.index} ({block.name})", down, x, bias)
            return
        scale = mask[keep]
        self._slice_params(block, keep, None if bool((scale == 1).all()) else scale, "down")
        k, w = keep.numel(), block.width
        self._drop_mask_node(block)
        for name in block.region:
            if name in self.nodes:
                n = self.nodes[name]
                self._rewrite_width_literals(n, w, k)
                self._resize_meta(n, w, k)

    @torch.no_grad()
    def fold_heads(self, block: AttentionBlock, mask: torch.Tensor) -> None:
        """Keep the key/value heads with ``mask != 0`` (and their query groups)."""
        keep = torch.nonzero(mask).flatten()
        o = self.nodes[block.o_node]
        if keep.numel() == 0:
            bias = None if block.o_bias is None else o.args[0] if o.target is aten.addmm.default else o.args[2]
            x = self._projection_input(block)
            self._zeros_instead(f"attention block {block.index} ({block.name})", o, x, bias)
            self.branch.update(_region_names(block))  # the attention kernel counts as impure: drop it anyway
            return
        scale = mask[keep]
        self._slice_params(block, keep, None if bool((scale == 1).all()) else scale, "o")
        self._drop_mask_node(block)
        k, kv = keep.numel(), block.num_kv_heads
        region = [(self.nodes[name], axis) for name, axis in block.region if name in self.nodes]
        if k != kv:
            for n, axis in region:
                _rewrite_head_literals(n, axis, kv, k)
        self._fake_prop([n for n, _ in region if n.op == "call_function"])

    def _rewrite_width_literals(self, n: Node, w: int, k: int) -> None:
        if n.target in VIEW_OPS:
            shape = list(n.args[1])
            if shape and shape[-1] == w:
                shape[-1] = k
                n.args = (n.args[0], shape) + tuple(n.args[2:])
        elif n.target is aten.split.Tensor and n.args[1] == w:
            n.args = (n.args[0], k) + tuple(n.args[2:])
        elif n.target is aten.split_with_sizes.default:
            n.args = (n.args[0], [k if s == w else s for s in n.args[1]]) + tuple(n.args[2:])

    def _resize_meta(self, n: Node, w: int, k: int) -> None:
        """Refresh ``meta["val"]`` of a region node after its width went from ``w`` to ``k``.

        Region nodes carry the intermediate dim last (``n * w`` for a fused projection),
        so the new value is the old one with that dim scaled; building it directly is
        much cheaper than re-running fake propagation over symbolic shapes. Weight
        transposes (the only region nodes with the width elsewhere) are re-propagated.
        """
        if n.op != "call_function":
            return
        if n.target in (aten.t.default, aten.transpose.int, aten.permute.default):
            with self.fake_mode:
                n.meta["val"] = n.target(*map_arg(n.args, lambda a: a.meta["val"]), **n.kwargs)
            return

        def resize(v):
            if isinstance(v, (list, tuple)):
                return type(v)(resize(x) for x in v)
            if not isinstance(v, torch.Tensor):
                return v
            shape = tuple(v.shape[:-1]) + (v.shape[-1] // w * k,)
            # blocks of one model share shapes; fake dispatch costs ~1 ms, so reuse values
            key = (str(shape), v.dtype, v.device)
            if key not in self._resized:
                with self.fake_mode:
                    self._resized[key] = v.new_empty(shape)
            return self._resized[key]

        n.meta["val"] = resize(n.meta["val"])

    def _fake_prop(self, nodes: list[Node]) -> None:
        with self.fake_mode:
            for n in nodes:
                args = map_arg(n.args, lambda a: a.meta["val"])
                kwargs = map_arg(n.kwargs, lambda a: a.meta["val"])
                n.meta["val"] = n.target(*args, **kwargs)

    def _projection_input(self, block) -> Node:
        """x as the block's first projection reads it (flattened for Conv1D's addmm)."""
        leaf = next(n for n in (self.nodes[r] for r in _region_names(block))
                    if n.op == "call_function" and n.target in PROJECTION_OPS)
        return leaf.args[1] if leaf.target is aten.addmm.default else leaf.args[0]

    def _zeros_instead(self, where: str, out: Node, x: Node, bias: Node | None) -> None:
        """Nothing kept: the block's output is ``zeros_like(x) (+ bias)``."""
        out_shape, x_shape = out.meta["val"].shape, x.meta["val"].shape
        if len(out_shape) != len(x_shape) or any(str(a) != str(b) for a, b in zip(out_shape, x_shape)):
            raise ProgramError(
                f"{where}: cannot drop everything, its output shape {tuple(out_shape)} differs from "
                f"its input shape {tuple(x_shape)}"
            )
        with self.graph.inserting_before(out):
            zeros = self.graph.call_function(aten.zeros_like.default, (x,))
            new = zeros if bias is None else self.graph.call_function(aten.add.Tensor, (zeros, bias))
        out.replace_all_uses_with(new)
        self._fake_prop([zeros] if bias is None else [zeros, new])

    def finish(self) -> ExportedProgram:
        eliminate_dead_code(self.graph, removable=self.branch)
        return rebuild_program(
            self.program, self.graph, state_dict=self.state_dict, constants=self.constants, new_specs=self.new_specs
        )


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
def specialize(
    program: ExportedProgram,
    instruction: str | torch.Tensor | None = None,
    *,
    mask=None,
    head_mask=None,
    tokenizer=None,
) -> ExportedProgram:
    """A smaller dense ExportedProgram equal to ``program`` evaluated with one mask.

    Give either ``instruction`` (text with ``tokenizer=``, or token ids ``[1, T]``; the
    program must have a predictor branch) or ``mask=`` (one 1-D tensor per FFN block,
    in execution order). ``program`` may be a masked program, a program with a
    predictor branch, or a plain exported program (then ``mask`` means the masked
    reference semantics). The result has no mask inputs and no mask ops.

    ``head_mask=`` (one 1-D tensor per attention block, one value per key/value head)
    also removes attention heads: a dropped key/value head takes its query group with
    it. It is required for a program built with ``insert_masks(ep, heads=True)``; with
    ``head_mask`` alone, every FFN channel is kept.
    """
    if not isinstance(program, ExportedProgram):
        raise ProgramError(f"specialize() takes a torch.export.ExportedProgram, got {type(program).__name__}")
    if instruction is not None and mask is not None:
        raise InstructionError("give either an instruction or mask=, not both")
    has_head_inputs = any(n.name.startswith(HEAD_MASK_PREFIX) for n in user_input_nodes(program))
    if has_head_inputs and head_mask is None:
        raise MaskError("this program has head mask inputs (insert_masks(..., heads=True)): pass head_mask=")
    if instruction is None and mask is None and head_mask is None:
        raise InstructionError("specialize() needs an instruction (with a predictor branch) or mask=")
    blocks = find_ffn_blocks(program)
    has_predictor = any(n.name == INSTRUCTION_INPUT for n in user_input_nodes(program))
    if instruction is not None:
        if not has_predictor:
            raise InstructionError(
                "this program has no predictor branch: build it with "
                "insert_masks(ep, predictor=...) or pass mask= instead of an instruction"
            )
        mask = predict_masks(program, blocks, instruction_ids(instruction, tokenizer))
    elif mask is None:
        if has_predictor:
            raise InstructionError("this program has a predictor branch: give an instruction or mask=")
        mask = [torch.ones(b.width) for b in blocks]
    masks = validate_masks(mask, blocks)
    heads = []
    if head_mask is not None:
        attention = find_attention_blocks(program)
        if not attention:
            raise ProgramError("head_mask= given, but no attention block was recognised:\n" + attention_report(program))
        heads = list(zip(attention, validate_masks(head_mask, attention, what="attention block", argument="head_mask")))
    folder = _Folder(program)
    for block, m in zip(blocks, masks):
        folder.fold(block, m)
    for block, m in heads:
        folder.fold_heads(block, m)
    return folder.finish()


def specialize_with_slices(program: ExportedProgram, mask) -> tuple[ExportedProgram, dict[str, tuple]]:
    """``specialize(program, mask=mask)``, and how each parameter it cut was computed:
    ``{state_dict key: (source key, axis, offsets, role, block index)}``.

    The second part is what lets a build write the next task of the same widths without
    running this pass (``shared_graphs``): the graph is the same, only these slices differ.
    """
    blocks = find_ffn_blocks(program)
    masks = validate_masks(mask, blocks)
    folder = _Folder(program)
    for block, m in zip(blocks, masks):
        folder.fold(block, m)
    return folder.finish(), dict(folder.slices)


__all__ = ["specialize", "specialize_with_slices", "predict_masks", "MaskError"]
