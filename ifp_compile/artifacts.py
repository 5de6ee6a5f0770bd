"""On-disk artifacts: a shared base, per-task ONNX graphs, manifests, verification.

Layout of a build directory (see ``build.py`` for how it is filled)::

    DIR/index.json                    every task: artifact dir, kept parameters, mask hash
    DIR/base/model.onnx               the base model, written once per base model hash
    DIR/base/shared.bin               its weights no task slices (embeddings, attention, norms, head)
    DIR/base/ffn.bin                  its dense FFN weights: what tasks are sliced from
    DIR/base/shared.safetensors       with pt2: the base program's parameters no task slices
    DIR/base/ffn.safetensors          with pt2: its dense FFN parameters
    DIR/base/manifest.json            sha256 of every base file, file and offset of every tensor
    DIR/tasks/<name>/model.onnx       the specialised graph
    DIR/tasks/<name>/shared.bin       hard link to DIR/base/shared.bin (no extra disk)
    DIR/tasks/<name>/ffn.bin          only this task's FFN weights (sliced, or whole where a layer is kept)
    DIR/tasks/<name>/program.pt2      with pt2: the specialised program, parameters left out
    DIR/tasks/<name>/program.ffn.safetensors     its own FFN parameters
    DIR/tasks/<name>/program.shared.safetensors  hard link to DIR/base/shared.safetensors
    DIR/tasks/<name>/manifest.json    inputs, hashes of every file, parameter counts
    DIR/graphs/<sha256>.onnx|.pt2     each distinct task graph once, hard-linked into its tasks
    DIR/graphs/plans/*.json           per signature (channels kept per block): how its tasks'
                                      weights are cut from the base (``shared_graphs``)

Why a hard link: ONNX Runtime and ``onnx.load`` refuse external data outside the
model's directory (``../base`` is rejected), so each task directory must contain the
weights it shares with the base; a hard link costs no disk and keeps every task
directory self-contained. Where hard links are impossible the file is copied and the
manifest says so. The pt2 program shares the base the same way (``program_weights``).

Why the base's weights are split in two: a task directory is shipped on its own (``cp
-L``, a container layer, a download to a phone: links dereferenced). If it linked the
whole base it would carry the dense FFN weights it never reads (1.8x a self-contained
model on SmolLM2 at keep 0.5); linking only the shared part, it is the size of a
self-contained specialised model. ``export_task`` writes such a copy.

Every file is written to a temporary name and renamed (atomic); a task directory is
assembled under a temporary name and renamed into place, so a killed build never leaves
a partial task. Nothing is pickled: ONNX protobuf, raw little-endian tensor bytes,
safetensors, JSON, and ``torch.export.save`` archives that ``torch.export.load`` reads
without pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import IFPError

ALIGN = 64
INLINE_BYTES = 1024  # smaller tensors stay in the protobuf
LAYOUT = 2  # of a build directory; 1 linked the whole base (dense FFN weights too) into every task
SHARED_BIN, FFN_BIN = "shared.bin", "ffn.bin"  # ONNX external data: weights every task shares / FFN weights
BASE_SHARED, BASE_FFN = "shared.safetensors", "ffn.safetensors"  # pt2 parameters, in DIR/base
PT2_FILES = {"program": "program.pt2", "own": "program.ffn.safetensors", "shared": "program.shared.safetensors",
             "alone": "program.safetensors"}
SHARED_FILES = frozenset({SHARED_BIN, PT2_FILES["shared"], "tokenizer.json"})  # links to the base: no disk of their own


class ArtifactError(IFPError):
    """An artifact on disk is missing, tampered with, or not an ifp-compile artifact."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def link_or_copy(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst`` (no extra disk); copy where links are impossible."""
    try:
        os.link(src, dst)
        return True
    except OSError:
        import shutil

        shutil.copyfile(src, dst)
        return False


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; an old version is removed after the swap."""
    import shutil

    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` whole or not at all: written and flushed under a temporary name,
    then renamed; the temporary file is removed if anything fails."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _tensor_bytes(tensor) -> bytes:
    return np.ascontiguousarray(tensor.numpy()).tobytes()  # ONNX raw data is little-endian, as is x86/arm


class _Packer:
    """Appends tensors to one external-data file with fixed alignment.

    The sha256 is computed as the bytes go out, so a manifest never re-reads a file
    that was just written (a task's FFN weights are ~160 MB on SmolLM2).
    """

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offset = 0
        self.sha256 = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def add(self, data) -> tuple[int, int]:
        """Append ``data`` (bytes, or a contiguous buffer) after padding; its (offset, length)."""
        pad = (-self.offset) % ALIGN
        if pad:
            self._write(b"\0" * pad)
        start = self.offset
        data = memoryview(data).cast("B")
        self._write(data)
        return start, len(data)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _external(value, location: str, offset: int, length: int, base_dir: Path):
    import onnx_ir as ir

    t = value.const_value
    return ir.ExternalTensor(location, offset, length, t.dtype, shape=t.shape, name=value.name, base_dir=str(base_dir))


def _strip_node_metadata(graph) -> None:
    """Drop per-node ``metadata_props`` (the exporter's stack traces, FX names, scopes).

    On SmolLM2 they are 4.2 MB of a 4.5 MB graph; a task graph repeats them for nothing
    (the base graph keeps them for debugging), and they are what would push a task over
    "kept FFN bytes + 2 MB" on disk.
    """
    for node in graph.node:
        node.ClearField("metadata_props")
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _strip_node_metadata(sub)


def _write_model(model, directory: Path, packers: dict[str, _Packer], choose, *,
                 strip_metadata: bool = False, external=frozenset()) -> str:
    """Point large initializers (and those named in ``external``) at external files
    chosen by ``choose(value)`` and save.

    Returns the sha256 of the written ``model.onnx``.
    """
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        t = value.const_value
        if t is None or (t.nbytes <= INLINE_BYTES and value.name not in external):
            continue
        location, span = choose(value)
        if span is None:
            span = packers[location].add(_tensor_bytes(t))
        value.const_value = _external(value, location, span[0], span[1], directory)
    proto = ir.to_proto(model)
    if strip_metadata:
        _strip_node_metadata(proto.graph)
        for function in proto.functions:
            for node in function.node:
                node.ClearField("metadata_props")
    data = proto.SerializeToString(deterministic=True)
    atomic_write(directory / "model.onnx", data)
    return hashlib.sha256(data).hexdigest()


def write_base(model, directory: Path, ffn_names) -> dict[str, Any]:
    """Write the base model (graph + every initializer) to ``directory``; returns its table.

    The initializers named in ``ffn_names`` (what specialisation slices) go to
    ``ffn.bin``, every other one to ``shared.bin``. The table maps initializer name ->
    [file, offset, length]; tasks point at a ``shared.bin`` tensor when their initializer
    has its name and size (see ``write_task_onnx``).
    """
    ffn_names = set(ffn_names)
    return write_packed(model, directory, lambda name: FFN_BIN if name in ffn_names else SHARED_BIN)


def write_packed(model, directory: Path, location_of) -> dict[str, Any]:
    """``model.onnx`` with each large initializer in the external file ``location_of(name)``
    (tensors streamed one at a time, each file renamed into place when complete)."""
    directory.mkdir(parents=True, exist_ok=True)
    packers: dict[str, _Packer] = {}
    table: dict[str, list] = {}

    def choose(value):
        location = location_of(value.name)
        if location not in packers:
            packers[location] = _Packer(directory / f".{location}.tmp")
        span = packers[location].add(_tensor_bytes(value.const_value))
        table[value.name] = [location, *span]
        return location, span

    from .passes.onnx_specialize import clone_model  # needs the onnx extra

    model = clone_model(model)  # re-point the copy's initializers, never the caller's
    try:
        _write_model(model, directory, packers, choose)
    finally:
        for packer in packers.values():
            packer.close()
    for location in packers:
        os.replace(directory / f".{location}.tmp", directory / location)
    return table


def write_task_onnx(model, directory: Path, base_dir: Path, base_table: dict[str, Any],
                    shared_sha256: str | None = None, *, external=frozenset()) -> dict[str, Any]:
    """Write a specialised ONNX model into a (temporary) task directory.

    Tensors identical to a shared base tensor point into ``shared.bin`` (a hard link to
    the base's); the rest -- the task's FFN weights, sliced or (a layer kept whole) not --
    go to ``ffn.bin``, and so do the small ones named in ``external`` (the task's sliced
    weights: kept out of the graph, the graph is the same for every task of its widths).
    Returns the sha256 of every file written under ``"files"`` and, under
    ``"ffn_layout"``, each ``ffn.bin`` tensor as ``[name, offset, length]``;
    ``shared_sha256`` (from the base manifest) spares re-hashing the shared weights for
    every task.
    """
    linked = link_or_copy(base_dir / SHARED_BIN, directory / SHARED_BIN)
    packer = _Packer(directory / FFN_BIN)
    own = 0
    layout: list[list] = []

    def choose(value):
        # specialize_onnx never changes an initializer under its old name (sliced ones
        # get new names), so a base name with the base size is the base tensor
        nonlocal own
        entry = base_table.get(value.name)
        if entry is not None and entry[0] == SHARED_BIN and entry[2] == value.const_value.nbytes:
            return SHARED_BIN, (entry[1], entry[2])
        own += value.const_value.nbytes
        span = packer.add(_tensor_bytes(value.const_value))
        layout.append([value.name, *span])
        return FFN_BIN, span

    try:
        graph_sha = _write_model(model, directory, {FFN_BIN: packer}, choose, strip_metadata=True, external=external)
    finally:
        packer.close()
    files = {"model.onnx": graph_sha, FFN_BIN: packer.sha256.hexdigest(),
             SHARED_BIN: shared_sha256 or sha256_file(directory / SHARED_BIN)}
    return {"base_linked": linked, "own_weight_bytes": own, "files": files, "ffn_layout": layout}


def write_task_pt2(small, base_program, directory: Path, base_dir: Path, shared_sha256: str,
                   ffn_names, own=None) -> dict[str, Any]:
    """Write a specialised program into a (temporary) task directory, sharing the base.

    ``program.pt2`` holds the graph with its parameters left out; the parameters that are
    not the base program's shared ones (its FFN weights, sliced or whole) go to
    ``program.ffn.safetensors``; the rest are read from ``program.shared.safetensors``, a
    hard link to the base's ``shared.safetensors`` (every base parameter not in ``ffn_names``).
    ``own``: those parameters, when the caller has computed them already.
    """
    from .program_weights import own_parameters

    linked = link_or_copy(base_dir / BASE_SHARED, directory / PT2_FILES["shared"])
    if own is None:
        own = own_parameters(small, base_program, not_shared=ffn_names)
    files = write_program(small, own, directory, PT2_FILES["own"])
    files[PT2_FILES["shared"]] = shared_sha256
    return {"pt2_base_linked": linked, "pt2_own_weight_bytes": sum(t.nbytes for t in own.values()), "files": files}


def write_program(program, parameters, directory: Path, parameters_file: str,
                  description: str | None = None) -> dict[str, str]:
    """``program.pt2`` (the graph, parameters left out) and ``parameters`` in ``parameters_file``.

    ``torch.export.save`` serialises the graph in Python (2-4 s for a 1B model, most of it a
    deep copy in its canonicalisation) while the weights stream through C calls that release
    the GIL, so the two run on two threads and overlap instead of adding up. Returns the
    sha256 of both files.
    """
    from concurrent.futures import ThreadPoolExecutor

    from .program_weights import write_parameters

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ifp-graph") as pool:
        graph = pool.submit(save_graph, program, directory / PT2_FILES["program"])
        sha = write_parameters(parameters, directory / parameters_file, description=description)
        return {PT2_FILES["program"]: graph.result(), parameters_file: sha}


def save_graph(program, path: Path) -> str:
    """``torch.export.save`` of ``program`` with its parameters left out, atomically; its sha256."""
    import torch

    from .program_weights import weightless

    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.pt2")  # torch warns unless the name ends in .pt2
    try:
        torch.export.save(weightless(program), str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256_file(path)


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    return {n: sha256_file(directory / n) for n in sorted(names)}


def verify_artifact(path: Path, *, cache: dict | None = None) -> dict[str, Any]:
    """Check every file a task manifest lists against its sha256; return the manifest."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: not an ifp-compile artifact (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{manifest_path}: malformed manifest ({e})") from None
    cache = {} if cache is None else cache
    for name, expected in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but missing")
        st = f.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        actual = cache.get(key) or sha256_file(f)
        cache[key] = actual
        if actual != expected:
            raise ArtifactError(f"{f}: sha256 {actual[:16]}... does not match the manifest ({expected[:16]}...): "
                                "the file was modified after the build")
    extra = sorted(p.name for p in path.iterdir() if p.name not in files and p.name != "manifest.json")
    if extra:
        raise ArtifactError(f"{path}: files not in the manifest: {', '.join(extra)}")
    return manifest


def _inline_external_data(model, directory: Path, allowed: set[str]) -> None:
    """Read external tensors into the proto ourselves.

    ``onnx.load`` refuses external data in a file with several hard links (its guard
    against hard-link attacks), which is exactly how tasks share ``shared.bin``; ONNX
    Runtime accepts it. The files were just checked against their sha256, and only
    names listed in the manifest (plain file names in this directory) are read.
    """
    from onnx import TensorProto

    handles: dict[str, Any] = {}
    try:
        for t in model.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            location = info.get("location", "")
            if location not in allowed:
                raise ArtifactError(f"{directory}: tensor {t.name} points at {location!r}, not a file of the artifact")
            f = handles.get(location) or handles.setdefault(location, open(directory / location, "rb"))
            f.seek(int(info.get("offset", 0)))
            t.raw_data = f.read(int(info["length"]))
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
    finally:
        for f in handles.values():
            f.close()


def load_artifact(path, *, format: str = "onnx", verify: bool = True):
    """Load a task artifact after checking every sha256.

    ``format="onnx"`` returns an ``onnx.ModelProto`` (external data loaded);
    ``format="pt2"`` returns the ExportedProgram (``torch.export.load``, no pickle), its
    parameters bound from the task's own file and then the shared one.
    """
    path = Path(path)
    manifest = verify_artifact(path) if verify else json.loads((path / "manifest.json").read_text())
    if format == "onnx":
        import onnx

        if "model.onnx" not in manifest["files"]:
            raise ArtifactError(f"{path}: no ONNX model in this artifact (formats: {manifest['formats']})")
        model = onnx.load(str(path / "model.onnx"), load_external_data=False)
        _inline_external_data(model, path, set(manifest["files"]))
        return model
    if format == "pt2":
        import torch

        from .program_weights import bind_parameters, parameters, read_parameters

        if PT2_FILES["program"] not in manifest["files"]:
            raise ArtifactError(f"{path}: no pt2 program in this artifact (formats: {manifest['formats']})")
        program = torch.export.load(str(path / PT2_FILES["program"]))
        if PT2_FILES["alone"] in manifest["files"]:  # ifp_compile.save: every parameter in one file
            alone = path / PT2_FILES["alone"]
            return bind_parameters(program, (str(alone), read_parameters(alone)))
        own_file, shared_file = path / PT2_FILES["own"], path / PT2_FILES["shared"]
        own = read_parameters(own_file)
        shared = read_parameters(shared_file, names=set(parameters(program)) - set(own))
        return bind_parameters(program, (str(own_file), own), (str(shared_file), shared))
    raise ArtifactError(f"unknown artifact format {format!r} (onnx or pt2)")
