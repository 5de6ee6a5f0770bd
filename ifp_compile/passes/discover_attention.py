"""Attention discovery: find every attention block and its head structure on the aten graph.

An attention block is *projections of x -> per-head values -> scaled_dot_product_attention
-> merge heads -> projection back*. Instead of matching op patterns, the pass follows the
**head axis** through the graph, backwards from each input of the attention kernel and
forwards from its output:

* views that split a projection's features into ``(heads, head_dim)`` or merge them back,
  and views that keep the shape;
* transposes/permutes (the axis moves), unsqueeze/expand/reshape and
  ``repeat_interleave`` that repeat key/value heads for their query group (GQA);
* pointwise ops (RoPE's ``q * cos + rotate_half(q) * sin``, dtype casts, aliases) whose
  other operands either broadcast over heads or are themselves per-head values of x;
* slices, ``cat`` and reductions on other axes (rotate_half, partial rotary, q/k norms);
* on the flattened features: slices and split outputs of one fused q/k/v projection.

So Llama/Mistral/Qwen2/Gemma (separate q/k/v, GQA by expand+reshape), GPT-2 (fused
Conv1D + split), Phi-3 (fused qkv + slices) and hand-written ``repeat_interleave`` GQA
are one case. Module names are never consulted for matching.

A *group* is a key/value head with the query heads that read it; groups are what head
masks select. Query head ``h`` belongs to group ``h // (heads // kv_heads)``: this holds
for ``repeat_interleave`` and for expand-then-merge (checked), and for the kernel's own
``enable_gqa``.

Invariants of an accepted block: every node carrying heads has all its users inside the
block (a head's values never leak elsewhere), the attention mask broadcasts over heads,
and the o projection reads the merged heads and nothing else.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.export import ExportedProgram
from torch.fx import Node

from ..blocks import AttentionBlock, HeadSlice
from ..errors import ProgramError
from ..graph_utils import ASSERT_OPS, ProgramIndex, before_casts, module_path_hint, val
from .discover_ffn import IDENTITY_OPS, SPLIT_OPS, VIEW_OPS, Projection, _is_pointwise, _Reject, _split_chunks, _strip_views, as_projection

aten = torch.ops.aten

SDPA_OPS = {aten.scaled_dot_product_attention.default}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
INT_MAX = 2**63 - 1

#: what the error says was tried when a model has FFN blocks but no attention was recognised
ATTENTION_PATTERNS_TRIED = (
    "q/k/v projections (aten.linear/addmm/mm, separate or one fused projection with split or slices) "
    "-> view to (heads, head_dim) -> transposes, RoPE and other pointwise ops, GQA repeat by "
    "expand+reshape or repeat_interleave -> aten.scaled_dot_product_attention -> merge heads -> "
    "o projection; eager attention written as matmul + softmax is not recognised"
)


def _same(a, b) -> bool:
    return str(a) == str(b)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


@dataclass
class _Found:
    """Projections feeding one attention input: (projection, offset, length) on its outputs."""

    leaves: list[tuple[Projection, int, int]] = field(default_factory=list)
    region: dict[Node, int] = field(default_factory=dict)  # node -> axis carrying heads/features
    heads: int = 0  # head count at the projection
    head_dim: int = 0
    repeat: int = 1  # query heads per key/value head introduced on the way (GQA)


class AttentionDiscovery(ProgramIndex):
    """Runs the head-axis match over one program (see module docstring)."""

    # -- backwards from the kernel's q/k/v ---------------------------------------------
    def _heads(self, n: Node, axis: int, f: _Found, x_users: set[Node]) -> None:
        """``n`` carries heads on ``axis``; follow them back to a projection of x."""
        v = val(n)
        if v is None:
            raise _Reject(f"{n.name} has no value metadata")
        axis %= v.dim()
        if n in f.region:
            return
        if n.op != "call_function":
            raise _Reject(f"{n.name} ({n.op}) carries heads but is not computed from x")
        f.region[n] = axis
        t, args = n.target, n.args
        if t in VIEW_OPS:
            src = args[0]
            sv = val(src)
            if _same_shape(sv.shape, v.shape):
                return self._heads(src, axis, f, x_users)
            if (sv.dim() == v.dim() - 1 and axis == v.dim() - 2 and _same_shape(sv.shape[:-1], v.shape[:axis])
                    and isinstance(v.shape[axis], int) and isinstance(v.shape[-1], int)
                    and sv.shape[-1] == v.shape[axis] * v.shape[-1]):
                f.head_dim = v.shape[-1]
                return self._features(src, 0, sv.shape[-1], f)
            if (sv.dim() == v.dim() + 1 and _same_shape(sv.shape[:axis], v.shape[:axis])
                    and _same_shape(sv.shape[axis + 2:], v.shape[axis + 1:])
                    and isinstance(sv.shape[axis + 1], int)):
                return self._repeat_merge(src, axis, sv.shape[axis + 1], f, x_users)
            raise _Reject(f"view {n.name} reshapes the head axis in a way not understood")
        if t is aten.transpose.int:
            d0, d1 = (a % v.dim() for a in args[1:3])
            return self._heads(args[0], d1 if axis == d0 else d0 if axis == d1 else axis, f, x_users)
        if t is aten.permute.default:
            return self._heads(args[0], list(args[1])[axis] % v.dim(), f, x_users)
        if t is aten.repeat_interleave.self_int:
            dim = args[2] if len(args) > 2 else n.kwargs.get("dim")
            if dim is None or dim % v.dim() != axis or not isinstance(args[1], int):
                raise _Reject(f"{n.name} repeats along another axis than the heads")
            f.repeat *= args[1]
            return self._heads(args[0], axis, f, x_users)
        if t in (aten.slice.Tensor,) and (args[1] if len(args) > 1 else 0) % v.dim() != axis:
            return self._heads(args[0], axis, f, x_users)
        if t is aten.cat.default and (args[1] if len(args) > 1 else 0) % v.dim() != axis:
            for a in args[0]:
                self._operand(a, n, axis, f, x_users)
            return
        if t in REDUCTIONS:
            dims = args[1] if len(args) > 1 else None
            keep = args[2] if len(args) > 2 else n.kwargs.get("keepdim", False)
            if dims is None or not keep or any(d % v.dim() == axis for d in dims):
                raise _Reject(f"reduction {n.name} touches the head axis")
            return self._heads(args[0], axis, f, x_users)
        if _is_pointwise(t):
            for a in n.all_input_nodes:
                self._operand(a, n, axis, f, x_users)
            return
        raise _Reject(f"{n.name} ({t}) on the head axis is not understood")

    def _operand(self, a: Node, user: Node, axis: int, f: _Found, x_users: set[Node]) -> None:
        """An input of a head-carrying op: a per-head value of x, or broadcast over heads."""
        av, uv = val(a), val(user)
        if av is None:
            return
        aligned = axis - (uv.dim() - av.dim())
        if a in x_users:
            if aligned < 0 or not _same(av.shape[aligned], uv.shape[axis]):
                raise _Reject(f"{a.name} mixes values of x into {user.name} across heads")
            self._heads(a, aligned, f, x_users)
        elif aligned >= 0 and av.shape[aligned] != 1:
            raise _Reject(f"{a.name} has a per-head value not computed from x (input of {user.name})")

    def _repeat_merge(self, src: Node, axis: int, rep: int, f: _Found, x_users: set[Node]) -> None:
        """``[.., kv, rep, ..] -> [.., kv * rep, ..]`` where ``rep`` comes from expanding a new axis."""
        e = src
        while e.op == "call_function" and e.target in IDENTITY_OPS:
            f.region[e] = axis
            e = e.args[0]
        if e.op != "call_function" or e.target is not aten.expand.default:
            raise _Reject(f"{src.name} merges the head axis with an axis that is not a repeat")
        ev = val(e.args[0])
        if ev.dim() != val(e).dim() or ev.shape[axis + 1] != 1:
            raise _Reject(f"expand {e.name} does not repeat each key/value head in place")
        f.region[e] = axis
        u = e.args[0]
        if u.op == "call_function" and u.target is aten.unsqueeze.default and u.args[1] % val(u).dim() == axis + 1:
            f.region[u] = axis
            f.repeat *= rep
            return self._heads(u.args[0], axis, f, x_users)
        raise _Reject(f"{u.name} is not an unsqueeze after the key/value head axis")

    def _features(self, n: Node, offset: int, length: int, f: _Found) -> None:
        """``n``'s last axis holds the heads' features at ``[offset, offset + length)``."""
        v = val(n)
        proj = as_projection(n, self.specs)
        if proj is not None:
            if offset + length > proj.out_features:
                raise _Reject(f"{n.name} has fewer outputs than the heads read")
            f.leaves.append((proj, offset, length))
            f.region[n] = v.dim() - 1
            return
        if n.op != "call_function":
            raise _Reject(f"{n.name} ({n.op}) is not a projection")
        f.region[n] = v.dim() - 1
        t, args = n.target, n.args
        if t in VIEW_OPS or t in IDENTITY_OPS:
            if t in VIEW_OPS and not _same(val(args[0]).shape[-1], v.shape[-1]):
                raise _Reject(f"view {n.name} changes the feature axis")
            return self._features(args[0], offset, length, f)
        if t is aten.slice.Tensor:
            dim = args[1] if len(args) > 1 else 0
            start = args[2] if len(args) > 2 else 0
            step = args[4] if len(args) > 4 else 1
            if dim % v.dim() != v.dim() - 1 or not isinstance(start, int) or step != 1:
                raise _Reject(f"slice {n.name} is not a plain slice of the features")
            return self._features(args[0], offset + (start or 0), length, f)
        if t is operator.getitem:
            split = args[0]
            if split.op == "call_function" and split.target in SPLIT_OPS:
                sizes = _split_chunks(split)
                if sizes is None:
                    raise _Reject(f"split {split.name} is not on the feature axis")
                f.region[split] = val(split.args[0]).dim() - 1
                return self._features(split.args[0], offset + sum(sizes[: args[1]]), length, f)
        raise _Reject(f"{n.name} ({t}) between a projection and the heads is not understood")

    # -- forwards from the kernel's output ---------------------------------------------
    def _single_user(self, n: Node) -> Node:
        users = [u for u in n.users if not (u.op == "call_function" and u.target in ASSERT_OPS)]
        if len(users) != 1:
            raise _Reject(f"{n.name} has {len(users)} users")
        return users[0]

    def _to_o(self, sdpa: Node, heads: int, head_dim: int):
        region: dict[Node, int] = {}
        n, axis = sdpa, 1
        mask_node = mask_source = unmasked = None
        while True:
            u = self._single_user(n)
            uv = val(u)
            if u.op != "call_function" or uv is None:
                raise _Reject(f"{u.name} after the attention is not understood")
            if u.target in VIEW_OPS and _same_shape(uv.shape, val(n).shape):
                pass
            elif u.target in IDENTITY_OPS:
                pass
            elif u.target is aten.transpose.int and axis is not None:
                d0, d1 = (a % uv.dim() for a in u.args[1:3])
                axis = d1 if axis == d0 else d0 if axis == d1 else axis
            elif u.target is aten.permute.default and axis is not None:
                axis = list(u.args[1]).index(axis)
            elif (u.target in VIEW_OPS and axis is not None and axis == val(n).dim() - 2
                  and uv.shape[-1] == heads * head_dim and _same_shape(uv.shape[:-1], val(n).shape[:axis])):
                axis = None  # merged: features on the last axis from here on
            elif u.target in VIEW_OPS and axis is None and uv.shape[-1] == heads * head_dim:
                pass  # flattening leading dims (Conv1D)
            elif axis is None and u.target is aten.mul.Tensor and any(a in self.mask_branch for a in u.all_input_nodes):
                if mask_node is not None:
                    raise _Reject(f"{u.name}: two head masks")
                mask_node, mask_source = u, next(a for a in u.all_input_nodes if a in self.mask_branch)
                unmasked = n
            else:
                proj = as_projection(u, self.specs)
                x = u.args[1] if u.target is aten.addmm.default else u.args[0]
                if axis is None and proj is not None and x is n and proj.in_features == heads * head_dim:
                    return proj, region, mask_node, mask_source, unmasked if mask_node is not None else n
                raise _Reject(f"{u.name} ({u.target}) after the attention is not understood")
            region[u] = uv.dim() - 1 if axis is None else axis
            n = u

    # -- one block ------------------------------------------------------------------
    def try_block(self, sdpa: Node, index: int) -> AttentionBlock:
        q, k, vv = sdpa.args[:3]
        attn_mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
        if isinstance(attn_mask, Node):
            mv = val(attn_mask)
            if mv is not None and mv.dim() == 4 and mv.shape[1] != 1:
                raise _Reject("the attention mask differs per head")
        # x: the common input of the projections; found from q first
        found = {}
        for role, node in (("q", q), ("k", k), ("v", vv)):
            probe = _Found()
            self._heads_unbounded(node, probe)
            found[role] = probe
        xs = {_strip_views(p.x) for f in found.values() for p, _, _ in f.leaves}
        if len(xs) != 1:
            raise _Reject("q, k and v are not projections of one input")
        heads = val(q).shape[1]
        head_dim = found["q"].head_dim
        kv = found["k"].heads
        if not all(isinstance(s, int) for s in (heads, head_dim, kv)) or kv == 0 or heads % kv:
            raise _Reject("head counts are not static or not a multiple of the key/value heads")
        if found["v"].heads != kv or found["k"].head_dim != head_dim or found["v"].head_dim != head_dim:
            raise _Reject("k and v have different head structures")
        if found["q"].heads != heads or found["q"].repeat != 1:
            raise _Reject("query heads are repeated")
        for role in ("k", "v"):
            rep = found[role].repeat
            gqa_kernel = bool(sdpa.kwargs.get("enable_gqa", False))
            if rep * kv != (kv if gqa_kernel else heads):
                raise _Reject(f"{role} heads are not repeated to match the query heads")
        o, out_region, mask_node, mask_source, o_input = self._to_o(sdpa, heads, head_dim)

        region: dict[Node, int] = {}
        for f in found.values():
            region.update(f.region)
        region[sdpa] = 1
        region.update(out_region)
        self._check_users(region, o.node)
        params = self._params(found, o, kv)
        specs = self.specs
        owners = set(region) | {o.node} | {e for f in found.values() for p, _, _ in f.leaves for e in p.extra}
        owners |= set(o.extra)
        shared = []
        for ps in params:
            ph = self.by_name[ps.placeholder]
            if any(u not in owners for u in ph.users):
                shared.append(ps.key)
        for e in [e for f in found.values() for p, _, _ in f.leaves for e in p.extra] + list(o.extra):
            region[e] = 0 if val(e) is None else val(e).dim() - 1
        hint = module_path_hint(o.node)
        name = hint.rsplit(".", 1)[0] if hint and "." in hint else f"attention.{index}"
        (x,) = xs
        return AttentionBlock(
            index=index, name=name, num_heads=heads, num_kv_heads=kv, head_dim=head_dim,
            params=tuple(params),
            o_bias=specs[o.bias.name].target if o.bias is not None else None,
            input_node=x.name, o_node=o.node.name, o_input=o_input.name,
            region=tuple(sorted(((n.name, a) for n, a in region.items()), key=lambda r: self.pos[self.by_name[r[0]]])),
            mask_node=mask_node.name if mask_node is not None else None,
            mask_source=before_casts(mask_source).name if mask_source is not None else None,
            shared_params=tuple(shared),
        )

    def _heads_unbounded(self, node: Node, f: _Found) -> None:
        """Follow one kernel input back; x is then the projections' common input."""
        self._heads(node, 1, f, self._x_users)
        if not f.leaves:
            raise _Reject(f"{node.name} does not come from a projection")
        counts = {length // f.head_dim for _, _, length in f.leaves} if f.head_dim else set()
        if len(counts) != 1:
            raise _Reject(f"{node.name} comes from projections of different head counts")
        f.heads = counts.pop()

    def _check_users(self, region: dict[Node, int], o: Node) -> None:
        inside = set(region) | {o}
        for n in region:
            for u in n.users:
                if u in inside or (u.op == "call_function" and u.target in ASSERT_OPS):
                    continue
                raise _Reject(f"{n.name} carries heads and is also used by {u.name}, outside the block")

    def _params(self, found: dict[str, _Found], o: Projection, kv: int) -> list[HeadSlice]:
        by_proj: dict[Node, tuple[Projection, list[tuple[int, int, str]]]] = {}
        for role, f in found.items():
            for p, offset, length in f.leaves:
                by_proj.setdefault(p.node, (p, []))[1].append((offset, length, role))
        params: list[HeadSlice] = []
        for p, segs in by_proj.values():
            segs.sort()
            if sum(length for _, length, _ in segs) != p.out_features:
                raise _Reject(f"{p.node.name} has outputs that are not read as heads")
            role = "".join(r for _, _, r in segs)
            segments = tuple((off, length // kv) for off, length, _ in segs)
            params.append(self._slice(p.weight, role, p.out_axis, segments))
            if p.bias is not None:
                params.append(self._slice(p.bias, f"{role}_bias", 0, segments))
        params.append(self._slice(o.weight, "o", o.in_axis, ((0, o.in_features // kv),)))
        return params

    def _slice(self, ph: Node, role: str, axis: int, segments) -> HeadSlice:
        return HeadSlice(self.specs[ph.name].target, ph.name, role, axis, segments, tuple(val(ph).shape))

    def run(self) -> list[AttentionBlock]:
        blocks: list[AttentionBlock] = []
        self.rejections: list[str] = []
        for n in self.nodes:
            if n.op != "call_function" or n.target not in SDPA_OPS:
                continue
            try:
                self._x_users = self._x_window(n)
                blocks.append(self.try_block(n, len(blocks)))
            except _Reject as e:
                self.rejections.append(f"{n.name}: {e}")
        return blocks

    def _x_window(self, sdpa: Node) -> set[Node]:
        """Nodes before ``sdpa`` that depend on a projection read by it (bounded search).

        Used to tell per-head values of x (RoPE's q and rotate_half(q)) from operands that
        merely broadcast over heads (cos/sin tables), whatever the head count.
        """
        roots = []
        stack, seen = list(sdpa.args[:3]), set()
        while stack:  # backwards to the projections feeding the kernel
            n = stack.pop()
            if not isinstance(n, Node) or n in seen:
                continue
            seen.add(n)
            if as_projection(n, self.specs) is not None:
                roots.append(n)
                continue
            if n.op == "call_function" and n.target not in SDPA_OPS:
                stack.extend(n.all_input_nodes)
        limit = self.pos[sdpa]
        out: set[Node] = set()
        stack = list(roots)
        while stack:
            n = stack.pop()
            if n in out or self.pos.get(n, limit + 1) > limit:
                continue
            out.add(n)
            stack.extend(n.users)
        return out


def find_attention_blocks(ep: ExportedProgram) -> list[AttentionBlock]:
    """Every attention block of ``ep`` whose head structure is recognised, in execution order.

    Returns an empty list when there is none (FFN-only pruning still works); use
    :func:`attention_report` for what was tried and why each kernel was not accepted.
    """
    if not isinstance(ep, ExportedProgram):
        raise ProgramError(f"expected a torch.export.ExportedProgram, got {type(ep).__name__}")
    return AttentionDiscovery(ep).run()


def attention_report(ep: ExportedProgram) -> str:
    """Why attention discovery found what it found (for error messages and ``--verbose``)."""
    d = AttentionDiscovery(ep)
    blocks = d.run()
    kernels = sum(1 for n in d.nodes if n.op == "call_function" and n.target in SDPA_OPS)
    lines = [f"{len(blocks)} attention blocks recognised out of {kernels} attention kernels; patterns tried: "
             + ATTENTION_PATTERNS_TRIED]
    lines += [f"  not recognised: {r}" for r in d.rejections]
    return "\n".join(lines)


__all__ = ["find_attention_blocks", "attention_report"]
