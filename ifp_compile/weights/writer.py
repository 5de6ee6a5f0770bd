"""safetensors written one tensor at a time, from tensors in memory or weightless ones.

Why not ``safetensors.torch.save_file``: it needs every tensor in memory at once, and a
task of an 8B model holds gigabytes of kept weights. The header of a safetensors file
needs only names, dtypes and shapes, which a weightless program knows; the data follows
in header order. So the header is written first, then each tensor is produced (read and
sliced from its checkpoint, for a weightless parameter), written and dropped. Peak memory
is the largest single tensor, and a program in memory and its weightless twin give the
same bytes.

Layout: tensors sorted by decreasing element size, then by name, so every tensor starts
at a multiple of its element size (the header is padded to 8 bytes); a tensor stored
under several names (a tied embedding and LM head) is written once and its other names
go into the metadata under ``ifp_compile.aliases``, which ``program_weights.read_parameters``
resolves. Identical inputs give identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .checkpoint import NAMES
from .lazy import lazy_of

ALIASES_KEY = "ifp_compile.aliases"


def storage_key(t: torch.Tensor):
    """What makes two names one stored tensor: the same memory (or the same weightless object)."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, contiguous: itself in memory, or materialized from its recipe."""
    if t.device.type != "meta":
        return t.detach().contiguous()
    lazy = lazy_of(t)
    if lazy is None:
        from ..errors import ProgramError

        raise ProgramError("a parameter on the meta device does not say where its values are; "
                           "it cannot be written (bind its weights first)")
    return lazy.materialize()


def _layout(tensors: Mapping[str, torch.Tensor]) -> tuple[list[str], dict[str, str]]:
    first: dict = {}
    stored, aliases = [], {}
    for name in sorted(tensors):
        key = storage_key(tensors[name])
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            stored.append(name)
    stored.sort(key=lambda n: (-tensors[n].element_size(), n))
    return stored, aliases


def write_safetensors(tensors: Mapping[str, torch.Tensor], path, *, metadata: Mapping[str, str] | None = None,
                      on_tensor: Callable[[str, int], None] | None = None) -> str:
    """Write ``tensors`` to ``path`` atomically, one at a time; returns the file's sha256.

    Weightless (meta) tensors are materialized from their recipe right before they are
    written. ``on_tensor(name, nbytes)`` is called after each tensor (progress). On any
    error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    names, aliases = _layout(tensors)
    header: dict = {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in NAMES:
            from ..errors import IFPError

            raise IFPError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    meta = dict(metadata or {})
    meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    header["__metadata__"] = dict(sorted(meta.items()))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    sha = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in (struct.pack("<Q", len(raw)), raw):
                f.write(chunk)
                sha.update(chunk)
            for name in names:
                t = values(tensors[name])
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
                f.write(data)
                sha.update(data)
                if on_tensor is not None:
                    on_tensor(name, len(data))
                del t, data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha.hexdigest()
