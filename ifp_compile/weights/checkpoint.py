"""A Hugging Face checkpoint directory read tensor by tensor, without mapping it.

Why not ``safetensors.safe_open``: it memory-maps each shard, and every page a read
touches stays in the process's resident set while the file is open. Streaming a 16 GB
checkpoint through a mapping drives the peak RSS towards the checkpoint's size even
though each tensor is needed only once. Here a tensor's bytes are read with ``readinto``
into a tensor of its own; once the caller drops it, the memory is gone.

The format is simple enough to read directly: 8 bytes of little-endian header length, a
JSON header (``dtype``, ``shape``, ``data_offsets`` relative to the end of the header)
and the raw little-endian data. ``model.safetensors.index.json`` maps tensor names to
shards. Only the headers are read when a checkpoint is opened.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import IFPError

#: safetensors dtype names
DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(IFPError):
    """A checkpoint directory is incomplete or does not match the model it claims to hold."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``file`` from byte ``offset``, ``nbytes`` long."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (size,) = struct.unpack("<Q", raw)
            if size > 100 * 2**20:
                raise CheckpointError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header, 8 + size


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory, read on demand.

    ``directory`` holds ``config.json`` and either ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``; every shard the index names must exist (checked
    when the checkpoint is opened, with the shard's name in the error).
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        d = self.directory
        if not d.is_dir():
            raise CheckpointError(f"checkpoint {d} is not a directory")
        if not (d / "config.json").is_file():
            raise CheckpointError(f"checkpoint {d} has no config.json (not a Hugging Face model directory)")
        if (d / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{d / INDEX_FILE}: not a safetensors index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(f"{d / INDEX_FILE} points to {len(missing)} missing shard(s): {', '.join(missing[:3])}")
        elif (d / SINGLE_FILE).is_file():
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"checkpoint {d} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            path = d / shard
            header, start = read_header(path)
            size = path.stat().st_size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != shard:
                    continue  # the index is the authority on where a tensor lives
                try:
                    dtype = DTYPES[entry["dtype"]]
                    begin, end = entry["data_offsets"]
                    shape = tuple(int(s) for s in entry["shape"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {entry}") from None
                if start + end > size:
                    raise CheckpointError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
                self.tensors[name] = TensorInfo(name, path, dtype, shape, start + begin, end - begin)
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self.tensors))
            if lost:
                raise CheckpointError(f"{lost[0]}: the index puts it in {d / weight_map[lost[0]]}, which does not "
                                      f"hold it ({len(lost)} such tensor(s))")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.directory}") from None

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``, read from its shard into memory of its own (or into ``out``,
        a uint8 tensor of exactly its size)."""
        info = self.info(name)
        if out is None:
            out = torch.empty(info.nbytes, dtype=torch.uint8)
        elif out.dtype != torch.uint8 or out.numel() != info.nbytes:  # pragma: no cover - caller's bug
            raise ValueError(f"read({name}): out must be {info.nbytes} uint8 values")
        try:
            with open(info.file, "rb", buffering=0) as f:
                f.seek(info.offset)
                got = f.readinto(memoryview(out.numpy()))
        except OSError as e:
            raise CheckpointError(f"{info.file}: reading tensor {name} failed ({e.strerror or e})") from None
        if got != info.nbytes:
            raise CheckpointError(f"{info.file}: tensor {name} is truncated ({got} of {info.nbytes} bytes)")
        if info.dtype == torch.bool:
            return out.view(torch.bool).reshape(info.shape)
        return out.view(info.dtype).reshape(info.shape)

    def check(self, name: str, shape: tuple[int, ...], what: str) -> TensorInfo:
        """The tensor ``name`` exists with ``shape``; the error names ``what`` needs it, and the file."""
        if name not in self.tensors:
            raise CheckpointError(f"{self.directory}: {what} needs tensor {name}, which no shard holds")
        info = self.tensors[name]
        if info.shape != tuple(shape):
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, but {what} needs "
                                  f"{list(shape)} (a checkpoint of another model?)")
        return info

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.directory)!r}, {len(self.tensors)} tensors)"


class TensorFile(Checkpoint):
    """The tensors of one safetensors file (a build's ``base/ffn.safetensors``), read on
    demand like a checkpoint's; names stored once under another name
    (``ifp_compile.aliases``, see ``weights.writer``) resolve to that tensor."""

    def __init__(self, path):
        path = Path(path)
        self.directory = path.parent
        header, start = read_header(path)
        size = path.stat().st_size
        self.tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                begin, end = entry["data_offsets"]
                info = TensorInfo(name, path, DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"]),
                                  start + begin, end - begin)
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {entry}") from None
            if info.offset + info.nbytes > size:
                raise CheckpointError(f"{path}: tensor {name} extends past the end of the file (truncated?)")
            self.tensors[name] = info
        from .writer import ALIASES_KEY

        aliases = json.loads((header.get("__metadata__") or {}).get(ALIASES_KEY, "{}"))
        for name, target in aliases.items():
            if target not in self.tensors:
                raise CheckpointError(f"{path}: alias {name} points at {target}, which the file does not hold")
            self.tensors[name] = self.tensors[target]

    def __repr__(self) -> str:
        return f"TensorFile({str(self.tensors and next(iter(self.tensors.values())).file)!r})"
