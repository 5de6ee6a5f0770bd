"""Tasks of the same widths share one graph; a task then costs its weight slicing and writing.

A specialised program's graph depends on the mask only through how many channels each
block keeps (and whether a block is dropped or kept whole and unscaled): which channels,
and their soft values, live in the weights. So the first task of a *signature* (per
block: channels kept, soft values or not) is built by the graph passes, and its graph is
stored once, content-addressed, in ``DIR/graphs/<sha256>.onnx`` / ``.pt2``, with a *plan*
(``DIR/graphs/plans/``) saying how each of its own weights was cut from the base
(base tensor, axis, offsets of fused projections, whether the mask's values are folded
in). Every later task of that signature hard-links the graph and writes its weights by
the plan, reading the base's dense FFN weights (``base/ffn.bin``, ``base/ffn.safetensors``)
one tensor at a time, with the same slicing function the passes use (``slicing``): the
same bytes as the passes would give (tests/test_shared_graphs.py builds every task both
ways and compares the files).

A plan is a pure function of the base (its hash, dtype, layout), the tool version and
the signature, and a task written from it needs only the base directory: this is what a
worker process or a Ray task runs (``write_from_plans``), with no model in memory.
Plans and graphs are written atomically and are identical whoever writes them, so
concurrent builds may race to write one. A graph file whose bytes no longer match its
name (edited in place through a task's hard link) is not used: the task is built by the
passes and the graph stored again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import __version__
from .artifacts import (
    BASE_FFN,
    BASE_SHARED,
    FFN_BIN,
    LAYOUT,
    PT2_FILES,
    SHARED_BIN,
    _Packer,
    atomic_write,
    dump_json,
    link_or_copy,
    sha256_file,
)
from .errors import IFPError

GRAPHS = "graphs"  # DIR/graphs: content-addressed task graphs and their plans
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2"}
GRAPH_FILE = {"onnx": "model.onnx", "pt2": PT2_FILES["program"]}
PLANNED = ("onnx", "pt2")  # the formats whose tasks can be written from a plan


class PlanError(IFPError):
    """A stored plan or graph cannot be used (missing, or its bytes changed): build the task
    with the passes instead."""


def signature(masks) -> list[list[int]]:
    """Per block ``[channels kept, 1 if the kept values are not all 1]``: what the graph of a
    specialised program depends on (the second part: a block kept whole and unscaled shares
    its weights instead of carrying a copy)."""
    return [[int(keep.size), int(scale is not None)] for keep, scale in _cuts(masks)]


def plan_path(out: Path, base: dict, fmt: str, sig) -> Path:
    key = hashlib.sha256(dump_json({"base_model_sha256": base["base_model_sha256"], "dtype": base["dtype"],
                                    "layout": LAYOUT, "tool_version": __version__, "format": fmt,
                                    "signature": sig})).hexdigest()
    return Path(out) / GRAPHS / "plans" / f"{fmt}-{key}.json"


def graph_path(out: Path, fmt: str, sha: str) -> Path:
    return Path(out) / GRAPHS / f"{sha}{SUFFIX[fmt]}"


def load_plans(out: Path, base: dict, formats, masks) -> dict[str, dict] | None:
    """The plan of every planned format in ``formats`` for ``masks``' signature, or None
    when one is missing (the task is then built by the passes, and its plans stored)."""
    sig = signature(masks)
    plans = {}
    for fmt in formats:
        if fmt not in PLANNED:
            continue
        try:
            plans[fmt] = json.loads(plan_path(out, base, fmt, sig).read_text())
        except (OSError, ValueError):
            return None
    return plans or None


def store(out: Path, base: dict, fmt: str, masks, task_dir: Path, plan: dict) -> None:
    """Keep task ``task_dir``'s graph (a hard link, no copy) and the plan of its signature."""
    target = graph_path(out, fmt, plan["graph"])
    target.parent.mkdir(parents=True, exist_ok=True)
    mine = task_dir / GRAPH_FILE[fmt]
    try:
        if not target.is_file():
            try:
                os.link(mine, target)  # atomic: the file appears whole or not at all
            except FileExistsError:
                pass
        if sha256_file(target) != plan["graph"]:  # changed since: this task's bytes take its place
            _replace_with_link(mine, target)
        elif not os.path.samefile(mine, target):  # stored by another signature's task: one copy
            _replace_with_link(target, mine)
    except OSError:
        return  # no hard links here: tasks keep their own graphs, nothing is planned
    path = plan_path(out, base, fmt, signature(masks))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, dump_json({**plan, "format": fmt, "signature": signature(masks)}))


def _replace_with_link(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def forget(out: Path, base: dict, fmt: str, masks) -> None:
    plan_path(out, base, fmt, signature(masks)).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# plans, from a task the passes built
# --------------------------------------------------------------------------------------
def onnx_plan(slices: dict, layout: list, base_model, info: dict) -> dict | None:
    """The plan of an ONNX task: ``slices`` from ``specialize_onnx_with_slices``, ``layout``
    (its ``ffn.bin``) from ``write_task_onnx``. None if it holds a weight that is not a slice
    of the base (nothing to replay it from)."""
    tensors, base_tensors = [], {}
    for name, offset, length in layout:
        if name not in slices:
            return None
        base_name, axis, offsets, role, block = slices[name]
        t = base_model.graph.initializers[base_name].const_value
        base_tensors[base_name] = [int(t.dtype), [int(d) for d in t.shape.numpy()]]
        tensors.append([name, offset, length, base_name, axis, offsets, role, block])
    return {"graph": info["files"]["model.onnx"], "tensors": tensors, "base_tensors": base_tensors,
            "own_weight_bytes": info["own_weight_bytes"], "onnx_initializer_scalars": info["onnx_initializer_scalars"]}


def pt2_plan(own: dict, slices: dict, ffn_names, info: dict) -> dict | None:
    """The plan of a pt2 task: ``own`` its own parameters (what ``program.ffn.safetensors``
    holds), ``slices`` from ``specialize_with_slices``. A base FFN parameter kept whole is
    read as it is; parameters stored once under several names stay one tensor."""
    from .weights.writer import _layout

    _, aliases = _layout(own)
    params = []
    for name in sorted(own):
        if name in aliases:
            continue
        if name in slices:
            params.append([name, *slices[name]])
        elif name in ffn_names:
            params.append([name, name, None, None, None, None])
        else:
            return None
    return {"graph": info["files"][PT2_FILES["program"]], "params": params, "aliases": aliases,
            "pt2_own_weight_bytes": info["pt2_own_weight_bytes"], "pt2_parameters": info["pt2_parameters"]}


# --------------------------------------------------------------------------------------
# a task from plans: runs in the build process, a worker process or a Ray task
# --------------------------------------------------------------------------------------
def _cuts(masks):
    """Per block: (kept channel indices, the values to fold into W_down or None), as the
    ONNX pass cuts them (``slicing.kept_channels``)."""
    from .slicing import kept_channels

    return [kept_channels(m) for m in masks]


def _link_graph(out: Path, fmt: str, plan: dict, task_dir: Path) -> str:
    src = graph_path(out, fmt, plan["graph"])
    try:
        actual = sha256_file(src)
    except OSError:
        raise PlanError(f"{src}: missing") from None
    if actual != plan["graph"]:
        raise PlanError(f"{src}: its bytes changed (sha256 {actual[:12]}...)")
    link_or_copy(src, task_dir / GRAPH_FILE[fmt])
    return actual


def _write_onnx(out: Path, base: dict, plan: dict, cuts, task_dir: Path) -> dict:
    import onnx_ir as ir

    from .slicing import take_array

    base_dir = out / "base"
    linked = link_or_copy(base_dir / SHARED_BIN, task_dir / SHARED_BIN)
    graph = _link_graph(out, "onnx", plan, task_dir)
    packer = _Packer(task_dir / FFN_BIN)
    try:
        for name, offset, length, base_name, axis, offsets, role, block in plan["tensors"]:
            location, start, nbytes = base["tensors"][base_name]
            code, shape = plan["base_tensors"][base_name]
            dtype = ir.DataType(code).numpy()
            if location != FFN_BIN or nbytes != int(np.prod(shape)) * dtype.itemsize:
                raise PlanError(f"plan for {name}: base tensor {base_name} is not the one it was made for")
            dense = np.fromfile(base_dir / FFN_BIN, dtype=dtype, count=int(np.prod(shape)), offset=start).reshape(shape)
            keep, scale = cuts[block]
            index = np.concatenate([keep + o for o in offsets])
            cut = take_array(dense, axis, index, scale if role == "down" else None)
            span = packer.add(cut.view(np.uint8))
            if list(span) != [offset, length]:
                raise PlanError(f"plan for {name}: written at {span}, the graph expects ({offset}, {length})")
    finally:
        packer.close()
    files = {"model.onnx": graph, FFN_BIN: packer.sha256.hexdigest(), SHARED_BIN: base["files"][SHARED_BIN]}
    return {"base_linked": linked, "own_weight_bytes": plan["own_weight_bytes"], "files": files,
            "onnx_initializer_scalars": plan["onnx_initializer_scalars"]}


def _write_pt2(out: Path, base: dict, plan: dict, cuts, task_dir: Path) -> dict:
    import torch

    from .program_weights import write_parameters
    from .weights.checkpoint import TensorFile
    from .weights.lazy import LazyWeight, lazy_parameter

    base_dir = out / "base"
    linked = link_or_copy(base_dir / BASE_SHARED, task_dir / PT2_FILES["shared"])
    graph = _link_graph(out, "pt2", plan, task_dir)
    source = TensorFile(base_dir / BASE_FFN)
    own = {}
    for name, base_key, axis, offsets, role, block in plan["params"]:
        info = source.info(base_key)
        lazy = LazyWeight(source, base_key, info.dtype, info.shape)
        if axis is not None:
            keep, scale = cuts[block]
            index = torch.from_numpy(np.concatenate([keep + o for o in offsets]))
            shape = list(info.shape)
            shape[axis] = int(index.numel())
            lazy = lazy.then(axis, index, torch.from_numpy(scale) if scale is not None and role == "down" else None,
                             shape)
        own[name] = lazy_parameter(lazy)
    for name, target in plan["aliases"].items():
        own[name] = own[target]
    sha = write_parameters(own, task_dir / PT2_FILES["own"])
    files = {PT2_FILES["program"]: graph, PT2_FILES["own"]: sha, PT2_FILES["shared"]: base["files"][BASE_SHARED]}
    return {"pt2_base_linked": linked, "pt2_own_weight_bytes": plan["pt2_own_weight_bytes"], "files": files,
            "pt2_parameters": plan["pt2_parameters"]}


def write_from_plans(out: str, base: dict, plans: dict, masks, task_dir: str) -> dict:
    """Write a task's ONNX and pt2 files into ``task_dir`` from ``plans`` (no model, no
    graph pass); returns what its manifest records, as the passes' path does."""
    out, task_dir = Path(out), Path(task_dir)
    empty(task_dir)  # a retried worker task starts again from nothing
    cuts = _cuts(masks)
    info: dict = {"files": {}}
    for fmt, write in (("onnx", _write_onnx), ("pt2", _write_pt2)):
        if fmt in plans:
            part = write(out, base, plans[fmt], cuts, task_dir)
            info["files"].update(part.pop("files"))
            info.update(part)
    return info


def empty(directory: Path) -> None:
    """Remove the files of a task's temporary directory (left by an attempt that died)."""
    for f in directory.iterdir():
        f.unlink()
