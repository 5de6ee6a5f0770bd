"""What FFN discovery records about each block.

A block is *projection(s) of x into width w -> a region of pointwise ops that keeps
w -> projection back*. Everything the later passes need to rewrite it is here, by
name (placeholder names and state_dict keys), so a block description stays valid
for any copy of the graph and can be printed, compared or serialised.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ParamSlice:
    """One tensor that has the block's intermediate dimension.

    ``axis`` is the intermediate axis in the tensor as stored. ``offsets`` lists
    where each width-sized segment starts along that axis: ``(0,)`` for an ordinary
    projection, ``(0, w)`` for a fused gate+up weight whose output is chunked in two.
    Kept channel ``c`` lives at ``offset + c`` in every segment.
    """

    key: str  # state_dict / constants key (fully qualified name)
    placeholder: str  # placeholder node name in the program graph
    role: str  # "gate", "up", "gate_up", "up_bias", ..., "down", "channel"
    axis: int
    offsets: tuple[int, ...] = (0,)
    shape: tuple[int, ...] = ()

    def params_per_channel(self) -> int:
        """Number of scalars this tensor holds per intermediate channel."""
        numel = 1
        for s in self.shape:
            numel *= s
        return numel // self.shape[self.axis] * len(self.offsets)


@dataclass(frozen=True)
class FFNBlock:
    """One FFN block found structurally on the aten graph."""

    index: int  # execution order (0-based)
    name: str  # human label (module path hint if present, else ffn.<index>)
    width: int  # intermediate dimension
    activation: str  # "silu", "gelu", "gelu_tanh", "relu", or "pointwise(<ops>)"
    gated: bool
    fused_gate_up: bool
    params: tuple[ParamSlice, ...]  # every tensor sliced on the intermediate axis (incl. down)
    down_bias: str | None  # key of b_down, which specialisation keeps as is
    position: int  # index of the down projection among the graph's nodes
    input_node: str  # x: the tensor projected into width w
    down_node: str  # the projection back
    hidden_node: str  # h(x): the intermediate activation, before any mask
    region: tuple[str, ...]  # nodes carrying width w (projections' outputs .. down input)
    mask_node: str | None = None  # the ``h * m`` node inserted by insert_masks
    mask_source: str | None = None  # the node producing m (user input or predictor branch)
    shared_params: tuple[str, ...] = field(default=())  # keys also used outside this block

    kind = "FFN block"

    @property
    def down(self) -> ParamSlice:
        return next(p for p in self.params if p.role == "down")

    def params_per_channel(self) -> int:
        """Scalars removed from the program per dropped channel (b_down excluded)."""
        return sum(p.params_per_channel() for p in self.params)

    def describe(self) -> str:
        kind = "gated" if self.gated else "plain"
        if self.fused_gate_up:
            kind += ", fused gate_up"
        shared = f", SHARED: {', '.join(self.shared_params)}" if self.shared_params else ""
        return f"[{self.index}] {self.name}: width {self.width}, {self.activation}, {kind}{shared}"


@dataclass(frozen=True)
class HeadSlice:
    """One tensor that holds attention heads along ``axis``, in key/value-head groups.

    A *group* is one key/value head together with the query heads that read it (GQA);
    removing a key/value head removes its whole group. In each segment ``(offset,
    size)`` group ``g`` occupies ``[offset + g * size, offset + (g + 1) * size)``:
    one segment for a plain projection (``size`` = heads per group * head_dim), three
    for a fused q/k/v projection (q, k and v parts of different sizes).
    """

    key: str
    placeholder: str
    role: str  # "q", "k", "v", "qkv" (fused), "<role>_bias", "o"
    axis: int
    segments: tuple[tuple[int, int], ...]
    shape: tuple[int, ...] = ()

    def index(self, kept_groups) -> "torch.Tensor":  # noqa: F821 - torch imported lazily
        """Positions along ``axis`` that the kept groups occupy, in the tensor's order."""
        import torch

        kept = torch.as_tensor(kept_groups, dtype=torch.long).reshape(-1, 1)
        return torch.cat([(off + kept * size + torch.arange(size)).flatten() for off, size in self.segments])

    def params_per_group(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel // self.shape[self.axis] * sum(size for _, size in self.segments)

    params_per_channel = params_per_group  # one accounting for channels and head groups


@dataclass(frozen=True)
class AttentionBlock:
    """One attention block found structurally on the aten graph (q/k/v -> sdpa -> o).

    ``width`` is the number of key/value heads: head masks have one value per group.
    ``region`` lists every node whose value carries heads, with the axis they are on
    (the feature axis for flattened projections' outputs), so specialisation can
    rewrite the sizes written into views, expands, slices and splits.
    """

    index: int
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    params: tuple[HeadSlice, ...]
    o_bias: str | None
    input_node: str  # x, read by the q/k/v projections
    o_node: str  # the output projection
    o_input: str  # the flattened attention output (before any head mask)
    region: tuple[tuple[str, int], ...]
    mask_node: str | None = None
    mask_source: str | None = None
    shared_params: tuple[str, ...] = field(default=())

    kind = "attention block"

    @property
    def width(self) -> int:
        return self.num_kv_heads

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def params_per_channel(self) -> int:
        """Scalars removed per dropped key/value head (with its query group; o bias excluded)."""
        return sum(p.params_per_group() for p in self.params)

    def describe(self) -> str:
        gqa = f", {self.heads_per_group} query heads per kv head" if self.num_heads != self.num_kv_heads else ""
        return (f"[{self.index}] {self.name}: {self.num_heads} heads, {self.num_kv_heads} kv heads, "
                f"head_dim {self.head_dim}{gqa}")
