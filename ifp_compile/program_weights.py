"""A program's graph and its parameters, stored apart.

Why: a build emits hundreds of specialised programs from one base model, and all their
parameters but the task's sliced FFN weights are the base's. ``torch.export.save``
writes every parameter into every archive (about 380 MB per SmolLM2 task at keep 0.5).
Here a task's archive keeps the graph, buffers and constants, with its parameters on
the ``meta`` device: they take no bytes, and an archive loaded without them refuses to
run (``Tensor on device cpu is not on the expected device meta``) instead of computing
with wrong weights. The parameters go to safetensors files -- the base's once per build,
each task's own ones beside its graph -- and :func:`bind_parameters` puts them back.

Everything here goes through public formats: ``torch.export.save``/``load`` for the
graph, safetensors for the tensors; nothing is pickled.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .artifacts import ArtifactError
from .passes.program_edit import copy_graph, rebuild_program
from .weights.writer import ALIASES_KEY, storage_key, write_safetensors

# per-node debug metadata a task graph does without (the base program keeps it): the
# export's source stack traces (megabytes, with paths of the machine that built it), the
# torch function names, and the module stacks. Without the module stacks
# ``torch.export.unflatten`` cannot rebuild a task's module tree; running, saving,
# ``run_decompositions`` and ``torch.compile`` do not need them. The ONNX task graphs drop
# the same information (the exporter's per-node metadata_props); on SmolLM2 this takes a
# task's graph archive from 4.3 MB to 1.8 MB. ``from_node`` (the provenance a re-export
# records) holds Python object ids of the graphs it came from: different in every
# process, so keeping it would make identical inputs give different archives.
DEBUG_META = ("stack_trace", "torch_fn", "nn_module_stack", "from_node")


class WeightsError(ArtifactError):
    """Parameters missing for, or not matching, a weightless program."""


def parameters(ep: ExportedProgram) -> dict[str, torch.Tensor]:
    """The program's parameters by state_dict name (tensors shared, not copied)."""
    names = [s.target for s in ep.graph_signature.input_specs if s.kind == InputKind.PARAMETER]
    return {n: ep.state_dict[n] for n in names}


def own_parameters(program: ExportedProgram, base: ExportedProgram, not_shared=()) -> dict[str, torch.Tensor]:
    """The parameters of ``program`` that are not ``base``'s very tensors, plus those named
    in ``not_shared`` (the base's FFN weights, which a task carries itself when it keeps a
    layer whole: they are not in the file tasks share).

    ``specialize`` shares every parameter it does not slice with its source program, so
    for a specialised program this is exactly the task's FFN weights.
    """
    theirs = parameters(base)
    not_shared = set(not_shared)
    own = {}
    for name, t in parameters(program).items():
        b = theirs.get(name)
        if b is None or name in not_shared or storage_key(b) != storage_key(t):
            own[name] = t
    return own


def ffn_parameter_names(program: ExportedProgram) -> set[str]:
    """The state_dict keys of every tensor specialisation slices (FFN gate/up/down, their biases)."""
    from .passes import find_ffn_blocks

    return {p.key for block in find_ffn_blocks(program) for p in block.params}


def weightless(ep: ExportedProgram) -> ExportedProgram:
    """A copy of ``ep`` whose parameters live on the meta device, without :data:`DEBUG_META`."""
    graph = copy_graph(ep)
    for node in graph.nodes:
        for key in DEBUG_META:
            node.meta.pop(key, None)
    state = dict(ep.state_dict)
    for name, t in parameters(ep).items():
        state[name] = torch.nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
    return rebuild_program(ep, graph, state_dict=state)


def bind_parameters(ep: ExportedProgram, *sources: tuple[str, Mapping[str, torch.Tensor]]) -> ExportedProgram:
    """``ep`` with each meta parameter taken from the first ``(where, tensors)`` source that has it.

    Every parameter must be found with the program's shape and dtype; the error names the
    parameter and the file it was looked up in.
    """
    state = dict(ep.state_dict)
    missing, wrong = [], []
    for name, meta in parameters(ep).items():
        if meta.device.type != "meta":
            continue
        found = next(((where, tensors[name]) for where, tensors in sources if name in tensors), None)
        if found is None:
            missing.append(name)
            continue
        where, t = found
        if tuple(t.shape) != tuple(meta.shape) or t.dtype != meta.dtype:
            wrong.append(f"{name} in {where}: {tuple(t.shape)} {t.dtype}, the program needs "
                         f"{tuple(meta.shape)} {meta.dtype}")
            continue
        state[name] = torch.nn.Parameter(t, requires_grad=meta.requires_grad)
    if missing:
        places = ", ".join(where for where, _ in sources)
        raise WeightsError(f"{len(missing)} parameter(s) of the program are in none of {places}: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if wrong:
        raise WeightsError("parameters do not match the program: " + "; ".join(wrong[:5]))
    return rebuild_program(ep, copy_graph(ep), state_dict=state)


def write_parameters(tensors: Mapping[str, torch.Tensor], path: Path, *, description: str | None = None) -> str:
    """Write ``tensors`` to a safetensors file atomically, one tensor at a time; returns its sha256.

    Weightless parameters are read (and sliced) from their checkpoint as they are written
    (``weights.writer``); a tensor shared by several names is stored once. ``description``
    shows a progress bar over the bytes written.
    """
    if description is None:
        return write_safetensors(tensors, path)
    from .progress import byte_bar

    distinct = {storage_key(t): t for t in tensors.values()}.values()
    bar = byte_bar(sum(t.numel() * t.element_size() for t in distinct), description)
    try:
        return write_safetensors(tensors, path, on_tensor=lambda _name, nbytes: bar.update(nbytes))
    finally:
        bar.close()


def read_parameters(path: Path, names=None) -> dict[str, torch.Tensor]:
    """The tensors of a file written by :func:`write_parameters`, aliases resolved.

    ``names`` limits the read to those names (the ones the file has): a task's program
    takes most FFN weights from its own file, so the base file's versions are never read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
            for name, target in aliases.items():
                if target not in keys:
                    raise WeightsError(f"{path}: alias {name} points at {target}, which the file does not hold")
            present = keys | set(aliases)
            loaded: dict[str, torch.Tensor] = {}  # one tensor per stored key, shared by its aliases
            tensors = {}
            for name in sorted(present if names is None else present & set(names)):
                key = aliases.get(name, name)
                if key not in loaded:
                    loaded[key] = f.get_tensor(key)
                tensors[name] = loaded[key]
    except WeightsError:
        raise
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable parameters file ({e})") from None
    return tensors
