"""Weightless programs: parameters that know where their values are, without holding them.

A program captured from a checkpoint (``export_checkpoint``) has every parameter on the
``meta`` device: shape and dtype, no bytes. Each such tensor carries a
:class:`LazyWeight`, the recipe for its values: *read tensor ``key`` from the checkpoint,
convert it to the program's dtype, then apply these slicing steps*. The graph passes never
need values (discovery, mask insertion and specialization are graph rewrites plus a
slicing plan), so they run on the weightless program unchanged; ``specialize`` records
its slices as steps (``slicing.take`` does it for meta tensors). Values are produced only
where they are consumed: by a writer, one tensor at a time (``weights.writer``), by
:func:`materialize`, or by the streaming interpreter that runs a predictor branch
(``weights.stream``).

The recipe lives on the tensor object (an attribute), not in the graph, because the same
parameter objects flow through ``ep.module()``, re-export and ``rebuild_program``: what
keeps the tensor keeps its recipe, with no pass needing to know.

Tracing needs values of the right *device*: a program's graph runs on the CPU, and
export refuses to mix CPU inputs with meta parameters. :func:`export_weightless` traces
with every meta parameter replaced by a fake CPU tensor (no memory) and puts the meta
parameters back into the exported program.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ProgramError

_ATTR = "_ifp_lazy"


@dataclass(frozen=True, eq=False)
class LazyWeight:
    """How to compute one parameter: ``take(..take(read(key).to(dtype), *step0).., *stepN)``."""

    source: Any  # a weights.checkpoint.Checkpoint (anything with read(key) and info(key))
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    steps: tuple[tuple[int, torch.Tensor, torch.Tensor | None], ...] = field(default=())

    def then(self, axis: int, index: torch.Tensor, scale: torch.Tensor | None, shape) -> "LazyWeight":
        return LazyWeight(self.source, self.key, self.dtype, tuple(shape), self.steps + ((axis, index, scale),))

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n

    def materialize(self, pool=None) -> torch.Tensor:
        """The values: read, converted and sliced exactly as the in-RAM passes would.

        With a ``weights.pool.BufferPool`` the source and each slice land in reused buffers
        (the result lives in one: give it back with ``pool.release`` once written).
        """
        from ..slicing import take

        info = self.source.info(self.key)
        t = self.source.read(self.key, out=pool.get(info.nbytes) if pool is not None else None)
        if t.dtype != self.dtype:  # a checkpoint stored in another dtype (rare): plain memory
            converted = t.to(self.dtype)
            if pool is not None:
                pool.release(t)
            t = converted
        for axis, index, scale in self.steps:
            shape = list(t.shape)
            shape[axis] = index.numel()
            sliced = take(t, axis, index, scale, out=pool.tensor(shape, t.dtype) if pool is not None else None)
            if pool is not None:
                pool.release(t)
            t = sliced
        if tuple(t.shape) != self.shape:  # pragma: no cover - a bug in the recorded steps
            raise ProgramError(f"internal: {self.key} materialized as {tuple(t.shape)}, expected {self.shape}")
        return t

    def describe(self) -> str:
        where = getattr(self.source, "info", None)
        file = where(self.key).file if where is not None else self.source
        return f"{self.key} in {file}" + (f" (sliced {len(self.steps)}x)" if self.steps else "")


def lazy_of(t: torch.Tensor) -> LazyWeight | None:
    """The recipe of a weightless tensor, or None (a real tensor, or a meta tensor without one)."""
    if not isinstance(t, torch.Tensor) or t.device.type != "meta":
        return None
    return getattr(t, _ATTR, None)


def lazy_parameter(lazy: LazyWeight, requires_grad: bool = False) -> nn.Parameter:
    """A meta parameter of ``lazy``'s shape and dtype that carries ``lazy``."""
    p = nn.Parameter(torch.empty(lazy.shape, dtype=lazy.dtype, device="meta"), requires_grad=requires_grad)
    setattr(p, _ATTR, lazy)
    return p


def derive(t: torch.Tensor, axis: int, index: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The meta tensor ``take(t, axis, index, scale)`` would give, its recipe extended by the step."""
    out = t.index_select(axis, index)
    lazy = lazy_of(t)
    if lazy is not None:
        setattr(out, _ATTR, lazy.then(axis, index.clone(), None if scale is None else scale.clone(), out.shape))
    return out


def keep_recipe(value: torch.Tensor, parameter: nn.Parameter) -> nn.Parameter:
    """``parameter`` (a new wrapper of ``value``) with ``value``'s recipe, if it had one."""
    lazy = lazy_of(value)
    if lazy is not None:
        setattr(parameter, _ATTR, lazy)
    return parameter


def weightless_parameters(ep) -> dict[str, LazyWeight]:
    """Parameter name -> recipe, for every parameter of ``ep`` on the meta device.

    A meta parameter without a recipe cannot be materialized: the error names it.
    """
    from ..program_weights import parameters

    out = {}
    for name, t in parameters(ep).items():
        if t.device.type != "meta":
            continue
        lazy = lazy_of(t)
        if lazy is None:
            raise ProgramError(f"parameter {name} is on the meta device and does not say where its values are "
                               "(a program loaded without its weights? bind them with program_weights.bind_parameters)")
        out[name] = lazy
    return out


def is_weightless(ep) -> bool:
    """True when some parameter of ``ep`` is on the meta device (values not in memory)."""
    from ..program_weights import parameters

    return any(t.device.type == "meta" for t in parameters(ep).values())


def materialize(ep):
    """``ep`` with every weightless parameter read into memory (tied ones read once).

    Reads what the program holds, sliced: a specialised program reads only its kept
    channels' values into memory (the source tensors pass through one at a time).
    """
    from ..program_weights import bind_parameters, parameters
    from ..progress import progress

    lazy = weightless_parameters(ep)
    if not lazy:
        return ep
    tensors, done = {}, {}
    params = parameters(ep)
    for name in progress(sorted(lazy), "reading weights"):
        key = id(params[name])
        if key not in done:
            done[key] = lazy[name].materialize()
        tensors[name] = done[key]
    where = ", ".join(sorted({str(getattr(w.source, "directory", w.source)) for w in lazy.values()}))
    return bind_parameters(ep, (where, tensors))


# --------------------------------------------------------------------------------------
# tracing with fake weights
# --------------------------------------------------------------------------------------
def _owner(module: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    path, _, attr = fqn.rpartition(".")
    return (module.get_submodule(path) if path else module), attr


@contextmanager
def fake_parameters(module: nn.Module, mode):
    """Within the block, every meta parameter of ``module`` is a fake CPU tensor of ``mode``.

    Tied parameters stay tied (one fake per meta tensor). On exit the module holds its
    original parameters again. Yields ``{id(fake): original}``.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    fakes: dict[int, nn.Parameter] = {}
    back: dict[int, nn.Parameter] = {}
    try:
        for fqn, p in list(module.named_parameters(remove_duplicate=False)):
            if p.device.type != "meta":
                continue
            if id(p) not in fakes:
                with mode:
                    fake = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad)
                fakes[id(p)] = fake
                back[id(fake)] = p
            owner, attr = _owner(module, fqn)
            swapped.append((owner, attr, p))
            owner._parameters[attr] = fakes[id(p)]
        yield back
    finally:
        for owner, attr, p in swapped:
            owner._parameters[attr] = p


def _check_buffers(module: nn.Module) -> None:
    for name, b in module.named_buffers():
        if b.device.type == "meta":
            raise ProgramError(f"buffer {name} is on the meta device: a weightless model keeps its buffers "
                               "(rotary frequencies, masks) real, only parameters may be weightless")


def call_with_fake_weights(module: nn.Module, *args):
    """``module(*args)`` computed on fake tensors when it has weightless parameters.

    For checks that need only shapes (a predictor's outputs against the blocks): running a
    weightless module for real would need its weights, and tracing it needs none.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils import _pytree as pytree

    if not any(p.device.type == "meta" for p in module.parameters()):
        return module(*args)
    _check_buffers(module)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with fake_parameters(module, mode):
        fake_args = pytree.tree_map_only(torch.Tensor, lambda t: mode.from_tensor(t, static_shapes=True), args)
        with mode:
            return module(*fake_args)


def export_weightless(module: nn.Module, args: tuple, kwargs: dict | None = None, **export_kwargs):
    """``torch.export.export`` for a module whose parameters may be on the meta device.

    The trace sees fake CPU parameters (so the graph is exactly a CPU export's); the
    exported program gets the original meta parameters, recipes included, back.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils import _pytree as pytree

    kwargs = kwargs or {}
    if not any(p.device.type == "meta" for p in module.parameters()):
        return torch.export.export(module, args, kwargs, **export_kwargs)
    _check_buffers(module)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with fake_parameters(module, mode) as back:
        fake_args, fake_kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: mode.from_tensor(t, static_shapes=True), (args, kwargs))
        ep = torch.export.export(module, fake_args, fake_kwargs, **export_kwargs)
    for name, t in list(ep.state_dict.items()):
        original = back.get(id(t))
        if original is not None:
            ep._state_dict[name] = original
        elif isinstance(t, torch._subclasses.fake_tensor.FakeTensor):  # pragma: no cover - defensive
            raise ProgramError(f"internal: {name} is still a fake tensor after a weightless export")
    ep._example_inputs = (args, kwargs)
    return ep
