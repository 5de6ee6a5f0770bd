"""Per-task GGUF files for llama.cpp and ollama, cut from a GGUF source.

    from ifp_compile.gguf_task import write_task_gguf
    info = write_task_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", masks, "math.gguf")

A task's GGUF is the source file with its FFN tensors cut to the task's channels, and
nothing else changed: the same tensor names, types and order, the same metadata
(tokenizer, chat template, rope) but ``<arch>.feed_forward_length``, which becomes the
task's width. So whatever runs the source runs the task.

Widths must be uniform (every layer keeps as many channels: IFPruning's per-task masks
are). Per-layer widths (Adapt-Pruner's ``adaptive_counts``) are refused: the llama.cpp in
``xllamacpp`` reads an array there but checks every layer's FFN tensors against one width
(``check_tensor_dims: tensor 'blk.3.ffn_gate.weight' has wrong shape; expected 576, 768,
got 576, 700``), so such a file would not load.

Why the cut is exact where it can be and re-quantizes only where it must: a quantized
GGML tensor of ggml shape ``[n_in, n_out]`` stores each of its ``n_out`` rows as blocks of
32 (or 256) consecutive inputs. ``ffn_gate`` and ``ffn_up`` have one row per FFN channel,
so keeping channels keeps whole rows, byte for byte. ``ffn_down`` has one row per hidden
unit whose *inputs* are the FFN channels: dropping channels cuts through its blocks. Its
kept columns are de-quantized, multiplied by the mask's soft scales in float32 and
quantized again with gguf-py's reference quantizers: by default to Q8_0 when the source
is a 4- or 5-bit type (a second 4-bit rounding over regrouped blocks costs far more than
the bytes it saves: docs/results.md, "GGUF tasks in llama.cpp"), to the source's own type on request
(``down_type="source"``), or written as F16 / F32. A layer that keeps every channel at
unit scale is copied as it is, and, re-quantizing to the source's type, output blocks
whose 32 kept channels are one aligned source block with unit scale are copied from the
source; so an all-ones mask gives back the source's bytes. The error this adds is one
more rounding of ``W_down`` in its type (benchmarks/gguf_tasks.py, docs/results.md).

The file is written tensor by tensor from the memory-mapped source (never the whole model
in RAM), to a temporary name that is renamed into place when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import IFPError

#: llama.cpp architectures whose FFN is ``ffn_gate`` / ``ffn_up`` / ``ffn_down`` per layer,
#: one channel per row of gate and up, with ``<arch>.feed_forward_length`` as its width
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "granite")

#: ``--gguf-down-type`` values: what ``ffn_down`` is written as (``_down_type``)
DOWN_TYPES = ("auto", "source", "q8_0", "f16", "f32")


class GGUFError(IFPError):
    """A GGUF source or a task's masks that a per-task GGUF cannot be written from."""


@dataclass(frozen=True)
class GGUFLayer:
    """The FFN tensors of one layer of a GGUF file (names as llama.cpp spells them)."""

    index: int
    width: int
    gate: str | None
    up: str
    down: str
    biases: tuple[str, ...] = ()


@dataclass
class GGUFTaskInfo:
    """What was written: per-layer widths and how each ``ffn_down`` was stored."""

    path: Path
    widths: list[int]
    down_types: list[str]
    copied_down_blocks: int = 0
    requantized_down_blocks: int = 0
    bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _reader(path):
    """gguf-py's reader of ``path``, parsed once per file version.

    Why cached: parsing is the slow part of cutting a task (gguf-py reads the metadata
    value by value: 1 s for SmolLM2's 49,152-token vocabulary with ``_fast_reader_class``,
    5.5 s without, against 0.7 s for cutting and writing the tensors), and a build or the
    demo cuts many tasks from one file. The key has the file's size and modification time,
    so a rewritten file is parsed again; the reader only maps the file read-only.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _READERS:
        try:
            reader = _fast_reader_class()(path, "r")
        except Exception as e:  # gguf-py raises ValueError/struct errors on anything not GGUF
            raise GGUFError(f"{path} is not a readable GGUF file: {e}") from None
        _READERS.clear()  # one source at a time: a reader holds a memory map of its file
        _READERS[key] = reader
    return _READERS[key]


_READERS: dict = {}


def _fast_reader_class():
    """gguf-py's ``GGUFReader`` with a faster ``_get``.

    Why: the reader takes every metadata value as a view of its ``np.memmap``, and a memmap
    view costs about 4 us of subclass bookkeeping (``__array_finalize__``): 250,000 of them
    for SmolLM2's vocabulary, 5.5 s. Views of the same bytes as a plain ``ndarray`` give the
    same fields and tensors (the map stays open as their base) in 1 s. ``_get`` is private to
    gguf-py, so the override checks its signature and falls back to the stock reader if
    gguf-py changes it.
    """
    import inspect

    import gguf

    base = gguf.GGUFReader
    if list(inspect.signature(base._get).parameters) != ["self", "offset", "dtype", "count", "override_order"]:
        return base  # pragma: no cover - another gguf-py

    class FastReader(base):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dt = np.dtype(dtype)
            count = int(count)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr if order == "I" else arr.view(dt.newbyteorder(order))

    return FastReader


def _field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def gguf_architecture(path) -> str:
    """The ``general.architecture`` of a GGUF file."""
    return str(_field(_reader(path), "general.architecture"))


def gguf_widths(path) -> list[int]:
    """The FFN width of every layer of a GGUF file (read from its tensor headers only)."""
    return [layer.width for layer in gguf_ffn_layers(_reader(path), path)]


def gguf_ffn_layers(reader, path="GGUF file") -> list[GGUFLayer]:
    """Every layer's FFN tensors, found by name and checked against the metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported for per-task GGUF files "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}: separate ffn_gate/ffn_up/ffn_down "
                        f"tensors per layer)")
    n_layers = _field(reader, f"{arch}.block_count")
    if not isinstance(n_layers, int):
        raise GGUFError(f"{path}: no {arch}.block_count in the metadata")
    tensors = {t.name: t for t in reader.tensors}
    declared = _field(reader, f"{arch}.feed_forward_length")
    layers = []
    for i in range(n_layers):
        names = {k: f"blk.{i}.ffn_{k}.weight" for k in ("gate", "up", "down")}
        for k in ("up", "down"):
            if names[k] not in tensors:
                raise GGUFError(f"{path}: layer {i} has no {names[k]} tensor")
        up, down = tensors[names["up"]], tensors[names["down"]]
        width = int(up.shape[1])  # ggml shape [n_embd, n_ff]
        if int(down.shape[0]) != width:
            raise GGUFError(f"{path}: layer {i}: {names['down']} has {int(down.shape[0])} inputs, "
                            f"{names['up']} {width} outputs")
        gate = names["gate"] if names["gate"] in tensors else None
        if gate is not None and int(tensors[gate].shape[1]) != width:
            raise GGUFError(f"{path}: layer {i}: {gate} has {int(tensors[gate].shape[1])} outputs, expected {width}")
        expected = declared[i] if isinstance(declared, list) else declared
        if expected is not None and int(expected) != width:
            raise GGUFError(f"{path}: layer {i}: {arch}.feed_forward_length says {expected}, "
                            f"the tensors have {width} channels")
        biases = tuple(n for n in (f"blk.{i}.ffn_gate.bias", f"blk.{i}.ffn_up.bias") if n in tensors)
        layers.append(GGUFLayer(i, width, gate, names["up"], names["down"], biases))
    return layers


def _check_masks(masks, layers, path) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(masks) != len(layers):
        raise GGUFError(f"{len(masks)} masks for the {len(layers)} FFN layers of {path}")
    kept = []
    for layer, m in zip(layers, masks):
        m = np.asarray(m, dtype=np.float32)
        if m.ndim != 1 or m.shape[0] != layer.width:
            raise GGUFError(f"mask {layer.index} has shape {tuple(m.shape)}, layer {layer.index} of {path} "
                            f"has {layer.width} FFN channels")
        if not np.all(np.isfinite(m)):
            raise GGUFError(f"mask {layer.index} has non-finite values")
        keep = np.flatnonzero(m)
        if keep.size == 0:
            raise GGUFError(f"mask {layer.index} keeps no channel: llama.cpp cannot load a zero-width FFN "
                            f"(layer {layer.index} of {path})")
        kept.append((keep, m[keep]))
    widths = [int(k.size) for k, _ in kept]
    if len(set(widths)) > 1:
        odd = next(i for i, w in enumerate(widths) if w != widths[0])
        raise GGUFError(f"per-layer FFN widths (layer 0 keeps {widths[0]} channels, layer {odd} {widths[odd]}): "
                        f"llama.cpp loads one feed_forward_length for every layer, so a GGUF with per-layer "
                        f"widths would not load; give masks that keep as many channels in every layer (a "
                        f"uniform keep), or use the pt2 or onnx format")
    return kept


def check_masks(path, masks, down_type: str = "auto") -> None:
    """Raise :class:`GGUFError` now if :func:`write_task_gguf` would refuse ``masks`` (their
    widths, or ``down_type`` for those widths): a build checks every task before writing."""
    reader = _reader(path)
    layers = gguf_ffn_layers(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    for layer, (keep, scale) in zip(layers, _check_masks(masks, layers, path)):
        intact = keep.size == layer.width and bool(np.all(scale == 1.0))
        _down_type(down_type, tensors[layer.down].tensor_type, keep.size, intact)


def _down_type(name: str, source_type, width: int, intact: bool = False):
    """The GGML type ``ffn_down`` is written as, and a note when ``source`` could not be kept."""
    import gguf

    T = gguf.GGMLQuantizationType
    if name == "f16":
        return T.F16, None
    if name == "f32":
        return T.F32, None
    if name == "q8_0":
        if width % 32:
            raise GGUFError(f"--gguf-down-type q8_0 needs widths that are multiples of 32, a layer keeps {width}")
        return T.Q8_0, None
    if name not in ("source", "auto"):
        raise GGUFError(f"unknown ffn_down type {name!r}; choose from {', '.join(DOWN_TYPES)}")
    if source_type in (T.F32, T.F16, T.BF16):
        return source_type, None
    if name == "auto" and source_type != T.Q8_0 and not intact:
        # a second 4- or 5-bit rounding of W_down, over regrouped blocks, costs far more
        # than its bytes save (docs/results.md, "GGUF"): 8 bits for the one tensor that is cut
        if width % 32:
            return T.F16, f"a width of {width} is not a multiple of Q8_0's block of 32: ffn_down written as F16"
        return T.Q8_0, None
    block = gguf.GGML_QUANT_SIZES[source_type][0]
    if width % block:
        return T.F16, (f"a width of {width} is not a multiple of {source_type.name}'s block of {block}: "
                       f"ffn_down written as F16")
    try:
        gguf.quants.quantize(np.zeros((1, block), np.float32), source_type)
    except NotImplementedError:
        return T.Q8_0 if width % 32 == 0 else T.F16, (f"gguf-py cannot quantize to {source_type.name}: "
                                                    f"ffn_down written as {'Q8_0' if width % 32 == 0 else 'F16'}")
    return source_type, None


def _encode(values: np.ndarray, qtype) -> np.ndarray:
    import gguf

    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(values.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def cut_down(tensor, keep: np.ndarray, scale: np.ndarray, qtype) -> tuple[np.ndarray, int, int]:
    """``ffn_down``'s kept input columns, scaled, in ``qtype``; whole aligned unit-scale
    blocks copied from the source. Returns (data, copied blocks, re-quantized blocks)."""
    import gguf

    src = tensor.tensor_type
    dense = gguf.quants.dequantize(tensor.data, src)  # [n_embd, n_ff] float32
    cols = dense[:, keep]
    if not np.all(scale == 1.0):
        cols = cols * scale[None, :]  # soft scales, folded in float32 and rounded once
    out = _encode(cols, qtype)
    if qtype != src or src in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                               gguf.GGMLQuantizationType.BF16):
        return out, 0, 0
    block, nbytes = gguf.GGML_QUANT_SIZES[src]
    runs = keep.reshape(-1, block)
    whole = (runs[:, 0] % block == 0) & np.all(np.diff(runs, axis=1) == 1, axis=1) \
        & np.all(scale.reshape(-1, block) == 1.0, axis=1)
    if whole.any():
        rows = dense.shape[0]
        src_blocks = tensor.data.reshape(rows, -1, nbytes)
        dst = out.reshape(rows, -1, nbytes)
        dst[:, whole] = src_blocks[:, runs[whole, 0] // block]
    return out, int(whole.sum()) * dense.shape[0], int((~whole).sum()) * dense.shape[0]


def write_task_gguf(source, masks, out, *, down_type: str = "auto", task: str | None = None,
                    progress=None) -> GGUFTaskInfo:
    """Write the per-task GGUF of ``source`` for ``masks`` (one per layer, zeros drop a
    channel, other values scale it) to ``out``, atomically.

    ``down_type`` is what ``ffn_down`` is stored as: ``auto`` (the source's type when it has
    8 bits or more, else Q8_0), ``source`` (its own type, re-quantized), ``q8_0``, ``f16``
    or ``f32``; F16 where a width is not a multiple of the type's block (noted in the info).
    ``progress(done_bytes, total_bytes)`` is called as tensors are written.
    """
    import gguf

    reader = _reader(source)
    layers = gguf_ffn_layers(reader, source)
    kept = _check_masks(masks, layers, source)
    arch = _field(reader, "general.architecture")
    widths = [int(k.size) for k, _ in kept]
    by_tensor: dict[str, tuple] = {}
    tensors = {t.name: t for t in reader.tensors}
    info = GGUFTaskInfo(Path(out), widths, [])
    for layer, (keep, scale) in zip(layers, kept):
        for name in (layer.gate, layer.up, *layer.biases):
            if name is not None:
                by_tensor[name] = ("rows", keep)
        down = tensors[layer.down]
        intact = keep.size == layer.width and bool(np.all(scale == 1.0))  # nothing cut: copied as it is
        qtype, note = _down_type(down_type, down.tensor_type, keep.size, intact)
        if note:
            info.notes.append(f"layer {layer.index}: {note}")
        info.down_types.append(qtype.name)
        by_tensor[layer.down] = ("down", keep, scale, qtype)

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        alignment = _field(reader, "general.alignment")
        if alignment is not None:
            writer.data_alignment = int(alignment)
        for f in reader.fields.values():
            if f.name == "general.architecture" or f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            if f.name == f"{arch}.feed_forward_length":
                continue
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        writer.add_uint32(f"{arch}.feed_forward_length", widths[0])
        if task is not None:
            writer.add_string("ifp_compile.task", task)
        writer.add_array("ifp_compile.kept_channels", widths)

        def produce(t):
            plan = by_tensor.get(t.name)
            if plan is None:
                return t.data, t.tensor_type
            if plan[0] == "rows":
                return np.ascontiguousarray(t.data[plan[1]]), t.tensor_type
            data, copied, requant = cut_down(t, plan[1], plan[2], plan[3])
            info.copied_down_blocks += copied
            info.requantized_down_blocks += requant
            return data, plan[3]

        # tensor infos need each tensor's final byte size before any data is written
        sizes = []
        for t in reader.tensors:
            plan = by_tensor.get(t.name)
            shape = [int(s) for s in t.shape]  # ggml order [ne0, ne1, ...]
            qtype = t.tensor_type
            if plan is not None and plan[0] == "rows":
                shape[-1] = int(plan[1].size)
            elif plan is not None:
                shape[0], qtype = int(plan[1].size), plan[3]
            nbytes = _nbytes(qtype, shape)
            sizes.append(nbytes)
            writer.add_tensor_info(t.name, list(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total, done = sum(sizes), 0
        for t, nbytes in zip(reader.tensors, sizes):
            data, _ = produce(t)
            if data.nbytes != nbytes:  # pragma: no cover - size computed above from the same plan
                raise GGUFError(f"internal: {t.name} is {data.nbytes} bytes, planned {nbytes}")
            writer.write_tensor_data(data)
            done += nbytes
            if progress is not None:
                progress(done, total)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    info.bytes = out.stat().st_size
    return info


def _nbytes(qtype, shape) -> int:
    """Bytes of a GGML tensor of ``qtype`` and ggml ``shape`` ([ne0, ne1, ...])."""
    import gguf

    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * nbytes
