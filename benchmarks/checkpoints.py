"""Random-weight Hugging Face checkpoints with real models' shapes, for benchmarks.

    python benchmarks/checkpoints.py --cache DIR [--only NAME ...] [--max-shard-bytes N]

Benchmarks need checkpoints the size of real models (loading, sharding and memory costs
depend on the shapes, not on the values) without downloading gated weights. Each one is
written once into ``DIR/<name>``, in bfloat16 and sharded like the hub
(``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, or a single
``model.safetensors``), and reused afterwards.

An 8B bf16 checkpoint is 16 GB, so the model is never materialised: tensor names and
shapes come from the real transformers class built on the meta device, values are
generated block by block from per-tensor seeds, and each shard is streamed to disk by a
small safetensors writer (``safetensors.torch.save_file`` needs every tensor in RAM).
Peak memory is the interpreter plus a few 1 MB blocks (~400 MB RSS in all).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

SEED = 0
CHUNK_ELEMS = 1 << 18  # values per block (1 MB of float32): cache-sized blocks are faster,
                       # and larger ones left ~300 MB more RSS in malloc arenas
BF16_BYTES = 2
CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
               attention_bias=False, mlp_bias=False, torch_dtype="bfloat16",
               bos_token_id=128000, eos_token_id=128001)

#: transformers config dicts (as in the hub's config.json) of the real models' shapes.
SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         head_dim=64, tie_word_embeddings=True, rope_scaling=_llama3_rope(32.0)),
    "qwen2.5-3b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                       hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_sliding_window=False, sliding_window=32768,
                       max_window_layers=36, torch_dtype="bfloat16",
                       bos_token_id=151643, eos_token_id=151643),
    "llama-3.1-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         head_dim=128, tie_word_embeddings=False, rope_scaling=_llama3_rope(8.0)),
}


# ---------------------------------------------------------------- names, shapes, values

def expected_tensors(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors ``save_pretrained`` would write, in state_dict order.

    The model is built by transformers itself on the meta device (no memory, ~1 s), so the
    names (Qwen2's q/k/v biases, ``lm_head.weight`` only when untied, ...) cannot drift
    from the real classes. Tied parameters appear twice in ``state_dict``; like
    ``save_pretrained`` only the first name is kept.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = copy.deepcopy(config_dict)  # transformers edits rope_scaling in place
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    wanted = config_dict.get("architectures", [type(model).__name__])[0]
    if type(model).__name__ != wanted:
        raise ValueError(f"config builds {type(model).__name__}, not {wanted}")
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tuple(tensor.shape)
    return out


def _init(name: str) -> tuple[float, float]:
    """(mean, std): norms ~ ones + noise, biases small, every other weight N(0, 0.02)."""
    if "norm" in name.rsplit(".", 2)[-2]:
        return 1.0, 0.01
    if name.endswith(".bias"):
        return 0.0, 0.01
    return 0.0, 0.02


def _blocks(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    """(first row, rows) blocks of <= CHUNK_ELEMS elements: a function of the shape only."""
    step = max(1, CHUNK_ELEMS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        yield start, min(step, shape[0] - start)


def make_chunk(name: str, shape: tuple[int, ...], start: int, rows: int, seed: int = SEED) -> torch.Tensor:
    """Rows ``start:start+rows`` of tensor ``name``, in bf16.

    Each block has its own generator seeded from sha256(seed, name, start), so any block
    is reproducible on its own: blocks can be generated in parallel, a test can regenerate
    one tensor without the others, and values do not depend on the shard layout.
    """
    digest = hashlib.sha256(f"{seed}/{name}/{start}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    mean, std = _init(name)
    x = torch.empty((rows, *shape[1:])).normal_(mean, std, generator=gen)
    return x.to(torch.bfloat16)


def tensor_chunks(name: str, shape: tuple[int, ...], seed: int = SEED) -> Iterator[torch.Tensor]:
    """A tensor's values as bf16 row blocks, in order."""
    for start, rows in _blocks(shape):
        yield make_chunk(name, shape, start, rows, seed)


def make_tensor(name: str, shape: tuple[int, ...], seed: int = SEED) -> torch.Tensor:
    """The whole tensor (for checks on small tensors)."""
    return torch.cat(list(tensor_chunks(name, shape, seed)))


def generate(shapes: dict[str, tuple[int, ...]], seed: int = SEED,
             threads: int = 2) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, bf16 block) for every block of every tensor, in order, computed by ``threads``
    workers at most 2*threads blocks ahead: generation (~70 M values/s per core) is the
    bottleneck, not the disk, and torch releases the GIL; lookahead bounds memory."""
    jobs = ((name, shape, start, rows) for name, shape in shapes.items()
            for start, rows in _blocks(shape))
    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for name, shape, start, rows in jobs:
            pending.append((name, pool.submit(make_chunk, name, shape, start, rows, seed)))
            if len(pending) > 2 * threads:
                name0, future = pending.popleft()
                yield name0, future.result()
        while pending:
            name0, future = pending.popleft()
            yield name0, future.result()


# ---------------------------------------------------------------- safetensors, streamed

def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                      chunks: Iterable[tuple[str, torch.Tensor]],
                      on_bytes: Callable[[int], None] = lambda n: None) -> int:
    """Stream a bf16 safetensors file: u64-LE header length, JSON header padded with spaces
    to a multiple of 8, then each tensor's little-endian bytes in header order. ``chunks``
    yields (name, bf16 row block) covering every tensor of ``shapes`` in order (checked).
    Returns the file size."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        end = offset + math.prod(shape) * BF16_BYTES
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    names, current, left = iter(shapes), None, 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, chunk in chunks:
            if left == 0:
                current = next(names, None)
                left = math.prod(shapes[current]) * BF16_BYTES if current else 0
            data = chunk.contiguous().view(torch.int16).numpy()
            if name != current or chunk.dtype != torch.bfloat16 or data.nbytes > left:
                raise RuntimeError(f"{path.name}: unexpected block of {name} while writing {current}")
            f.write(data)
            left -= data.nbytes
            on_bytes(data.nbytes)
        if left or next(names, None) is not None:
            raise RuntimeError(f"{path.name}: stream ended before {current or 'every tensor'} was written")
        f.flush()
        os.fsync(f.fileno())  # data on disk before the directory is renamed into place
    return 8 + len(blob) + offset


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {"header_bytes": 8 + n, "tensors": header}


# ---------------------------------------------------------------- checkpoint directories

def plan_shards(shapes: dict[str, tuple[int, ...]], max_shard_bytes: int) -> dict[str, dict]:
    """File name -> {name: shape}, filled in order like ``save_pretrained``: a new shard
    starts when the next tensor would push the data past ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own)."""
    groups: list[dict] = []
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * BF16_BYTES
        if not groups or (groups[-1] and size + n > max_shard_bytes):
            groups.append({})
            size = 0
        groups[-1][name] = shape
        size += n
    if len(groups) == 1:
        return {SINGLE: groups[0]}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": g for i, g in enumerate(groups, 1)}


def is_complete(directory: Path, config_dict: dict) -> bool:
    """config.json (written last) equals ``config_dict``, and every shard named by the
    index (or model.safetensors) exists with the size its own header implies and holds
    exactly the tensors the index maps to it. Reads headers only."""
    directory = Path(directory)
    try:
        if json.loads((directory / CONFIG).read_text()) != config_dict:
            return False
        if (directory / INDEX).exists():
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        else:
            weight_map = {k: SINGLE for k in _read_header(directory / SINGLE)["tensors"]}
        for file in set(weight_map.values()):
            head = _read_header(directory / file)
            ends = [t["data_offsets"][1] for t in head["tensors"].values()]
            if (directory / file).stat().st_size != head["header_bytes"] + max(ends, default=0):
                return False
            if set(head["tensors"]) != {k for k, v in weight_map.items() if v == file}:
                return False
        return True
    except (OSError, ValueError, KeyError, struct.error):
        return False


def write_checkpoint(directory: Path, config_dict: dict, max_shard_bytes: int = 5 * 10**9,
                     seed: int = SEED, progress: bool = True, desc: str = "") -> None:
    """Write shards, then the index, then config.json into an existing (empty) directory."""
    from tqdm import tqdm

    shapes = expected_tensors(config_dict)
    shards = plan_shards(shapes, max_shard_bytes)
    total = sum(math.prod(s) for s in shapes.values()) * BF16_BYTES
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for file, group in shards.items():
            write_safetensors(directory / file, group, generate(group, seed), bar.update)
    if len(shards) > 1:
        weight_map = {name: file for file, group in shards.items() for name in group}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def ensure_checkpoint(name: str, cache_dir: str | Path, max_shard_bytes: int = 5 * 10**9,
                      progress: bool = True) -> Path:
    """``cache_dir/name``, written first if it is missing or incomplete.

    The checkpoint is written into a temporary sibling directory and ``os.replace``d into
    place, so ``cache_dir/name`` is either absent, a leftover that fails ``is_complete``
    (replaced), or complete. A complete directory is reused whatever its shard size.
    """
    config = SHAPES[name]
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if is_complete(final, config):
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a shared cache unreadable to others
    try:
        write_checkpoint(tmp, config, max_shard_bytes, progress=progress, desc=name)
        if final.exists():  # an incomplete leftover: move it aside, then delete it
            stale = Path(tempfile.mkdtemp(prefix=f".{name}.stale-", dir=cache_dir))
            os.replace(final, stale)
            shutil.rmtree(stale)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not is_complete(final, config):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="directory holding one folder per checkpoint")
    parser.add_argument("--only", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 10**9)
    args = parser.parse_args(argv)
    for name in args.only:
        t0 = time.perf_counter()
        path = ensure_checkpoint(name, args.cache, args.max_shard_bytes)
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"{path}  {size / 1e9:.2f} GB  ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
