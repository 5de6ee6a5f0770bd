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
