"""safetensors written one tensor at a time, from tensors in memory or weightless ones.

Why not ``safetensors.torch.save_file``: it needs every tensor in memory at once, and a
task of an 8B model holds gigabytes of kept weights. The header of a safetensors file
needs only names, dtypes and shapes, which a weightless program knows; the data follows
in header order. So the header is written first, then each tensor is produced (read and
sliced from its checkpoint, for a weightless parameter), written and dropped, and a program
in memory and its weightless twin give the same bytes.

Three things run at once, because on these machines first-touch memory, hashing and the
disk each cost about as much as the copy itself: the next tensor is read and sliced on a
second thread while the current one is written and hashed (``ahead``), slices land in
reused buffers (``pool``), and what has been written is flushed to disk in the background
(``_Flusher``). Peak memory is the largest tensor (an embedding table) plus the next one
while they fit in 1 GiB, and the pool's buffers.

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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .checkpoint import NAMES
from .lazy import lazy_of
from .pool import BufferPool

ALIASES_KEY = "ifp_compile.aliases"


def storage_key(t: torch.Tensor):
    """What makes two names one stored tensor: the same memory (or the same weightless object)."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def values(t: torch.Tensor, pool=None, name: str = "a parameter") -> torch.Tensor:
    """``t``'s values, contiguous: itself in memory, or materialized from its recipe (into
    ``pool``'s buffers when given)."""
    if t.device.type != "meta":
        return t.detach().contiguous()
    lazy = lazy_of(t)
    if lazy is None:
        from ..errors import ProgramError

        raise ProgramError(f"{name} is on the meta device and does not say where its values are: it cannot "
                           "be written (a program loaded without its weights? bind them first)")
    return lazy.materialize(pool)


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


def ahead(names: list[str], produce: Callable[[str], object], size: Callable[[str], int],
          budget: int = 1 << 30) -> Iterator[tuple[str, object]]:
    """``(name, produce(name))`` in order, the next one produced in a thread meanwhile.

    Reading (and slicing) a weight is I/O and memory copies; writing and hashing the previous
    one is too, and both release the GIL: on two cores they overlap. The next tensor is
    produced ahead only while the two fit in ``budget`` bytes, so peak memory stays about
    one large tensor (an embedding table) plus a small one.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ifp-read") as pool:
        pending = None
        for i, name in enumerate(names):
            value = pending.result() if pending is not None else produce(name)
            pending = None
            if i + 1 < len(names) and size(name) + size(names[i + 1]) <= budget:
                pending = pool.submit(produce, names[i + 1])
            yield name, value
            del value


class _Flusher:
    """Flushes what has been written so far to disk in the background, every ``every`` bytes.

    Left alone, the kernel keeps a file's dirty pages in memory until the closing ``fsync``
    (or until gigabytes are dirty), so the disk idles while tensors are produced and then
    works alone at the end. ``fdatasync`` on a second thread (it releases the GIL) keeps the
    disk busy while the next tensors are read, sliced and hashed; the final ``fsync`` has
    little left to do.
    """

    def __init__(self, f, every: int = 256 * 2**20):
        from concurrent.futures import ThreadPoolExecutor

        self.f, self.every, self.pending = f, every, 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ifp-sync")
        self.job = None

    def wrote(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.every and (self.job is None or self.job.done()):
            if self.job is not None:
                self.job.result()  # a failed flush (a full disk) surfaces here
            self.f.flush()
            self.job = self.pool.submit(os.fdatasync, self.f.fileno())
            self.pending = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True)
        if self.job is not None and exc[0] is None:
            self.job.result()


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
            sizes = {n: header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names}

            pool = BufferPool()

            def produce(name: str):
                t = values(tensors[name], pool, name)
                return t, memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")

            with _Flusher(f) as flusher:
                for name, (t, data) in ahead(names, produce, sizes.__getitem__):
                    f.write(data)
                    sha.update(data)
                    flusher.wrote(len(data))
                    del data
                    pool.release(t)
                    if on_tensor is not None:
                        on_tensor(name, t.numel() * t.element_size())
                    del t
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha.hexdigest()
