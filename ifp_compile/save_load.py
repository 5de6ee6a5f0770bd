"""``ifp_compile.save`` / ``load``: one self-contained artifact directory per program.

    small = ifp.specialize(ifp.export_checkpoint("Llama-3.1-8B/"), mask=masks)  # nothing read yet
    ifp.save(small, "task/")                      # program.pt2 + program.safetensors, streamed
    ifp.save(small, "task-onnx/", format="onnx")  # model.onnx + weights.bin, streamed
    program = ifp.load("task/")                   # an ExportedProgram, every sha256 checked first

Why a directory: the graph and the weights are different kinds of data (a graph archive a
few MB, weights up to tens of GB), and keeping them in separate, standard files lets the
weights be written one tensor at a time from a checkpoint (a weightless program is never
materialized) and read back with plain safetensors or ONNX external-data tooling. The
layout is the one ``ifp-compile build`` uses for its tasks, without the shared base:

    DIR/program.pt2            the graph, its parameters left out (torch.export.save, no pickle)
    DIR/program.safetensors    every parameter (tied ones once, aliases in the metadata)
    DIR/model.onnx, weights.bin  with format="onnx": the graph and its external data
    DIR/manifest.json          format, dtype, parameter count and the sha256 of every file

The directory is assembled under a temporary name beside ``DIR`` and renamed into place:
a failure (a full disk) leaves no partial artifact, and an existing one is replaced only
by a complete one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch.export import ExportedProgram

from . import __version__
from .artifacts import PT2_FILES, ArtifactError, atomic_write, dump_json, replace_dir
from .errors import ProgramError

PT2_PROGRAM = PT2_FILES["program"]
PT2_PARAMETERS = PT2_FILES["alone"]
FORMATS = ("pt2", "onnx")


def _dtype(program: ExportedProgram) -> str:
    from .program_weights import parameters

    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in parameters(program).values() if t.is_floating_point()})
    return dtypes[0] if len(dtypes) == 1 else ",".join(dtypes)


def write_pt2(program: ExportedProgram, directory: Path) -> dict[str, str]:
    """``program.pt2`` (graph, parameters left out) and ``program.safetensors``; returns their sha256."""
    from .artifacts import write_program
    from .program_weights import parameters

    return write_program(program, parameters(program), directory, PT2_PARAMETERS,
                         description=f"writing {PT2_PARAMETERS}")


def write_onnx(program: ExportedProgram, directory: Path) -> dict[str, str]:
    """``model.onnx`` with every weight in ``weights.bin`` (streamed); returns their sha256."""
    from .artifacts import file_hashes, write_packed
    from .onnx import export_onnx_model

    table = write_packed(export_onnx_model(program), directory, lambda name: "weights.bin")
    return file_hashes(directory, ["model.onnx", *sorted({entry[0] for entry in table.values()})])


def save(program: ExportedProgram, directory, *, format: str = "pt2") -> dict:
    """Write ``program`` (in memory or weightless) as a self-contained artifact directory.

    Weightless parameters are read from their checkpoint, sliced and written one tensor at
    a time. Returns the manifest (also written to ``DIR/manifest.json``).
    """
    from .stats import count_parameters

    if not isinstance(program, ExportedProgram):
        raise ProgramError(f"save() takes a torch.export.ExportedProgram, got {type(program).__name__}")
    if format not in FORMATS:
        raise ArtifactError(f"unknown artifact format {format!r} (choose {' or '.join(FORMATS)})")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ArtifactError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = write_pt2(program, tmp) if format == "pt2" else write_onnx(program, tmp)
        manifest = {"format": format, "formats": [format], "dtype": _dtype(program),
                    "parameters": count_parameters(program), "files": dict(sorted(files.items())),
                    "tool_version": __version__}
        atomic_write(tmp / "manifest.json", dump_json(manifest))
        replace_dir(tmp, directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"writing {e.filename or directory} failed: {e.strerror or e}; nothing was left at {directory}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load(directory, *, verify: bool = True):
    """The program saved in ``directory``: an ExportedProgram (pt2) or an ``onnx.ModelProto``."""
    import json

    from .artifacts import load_artifact

    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an ifp-compile artifact (no manifest.json)")
    try:
        fmt = json.loads(path.read_text())["formats"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e})") from None
    return load_artifact(directory, format=fmt, verify=verify)
