"""A task's GGUF written from a Hugging Face checkpoint (``build --format gguf --gguf-type``).

    write_hf_task_gguf("Llama-3.2-1B/", masks, "math.gguf", qtype="q8_0", task="math")

Why a second GGUF writer: people keep their models as sharded safetensors and deploy with
llama.cpp / ollama. Converting the whole checkpoint first (llama.cpp's
``convert_hf_to_gguf.py``) and then cutting tasks from it works (``gguf_task``), but writes
the dense model once more and quantizes weights no task keeps. Here each tensor is read from
its shard, the task's FFN channels are taken (soft mask values folded into ``W_down`` in
float32), and the result is quantized straight to ``qtype``: one tensor in memory at a time.

Scope (refused, with the reason, otherwise):

* architectures ``LlamaForCausalLM`` / ``MistralForCausalLM`` (GGUF ``llama``: the query and
  key rows are reordered from Hugging Face's rotate-half layout into the interleaved pairs
  llama.cpp's rope expects) and ``Qwen2ForCausalLM`` (GGUF ``qwen2``: NeoX rope, rows kept
  as they are; query/key/value biases);
* rope scaling none or ``llama3`` (Llama 3.1/3.2: the per-frequency factors are written as
  ``rope_freqs.weight``, computed from transformers' own rope initialisation);
* byte-level BPE tokenizers (``tokenizer.json``; GPT-2, Llama 3, Qwen2, SmolLM): tokens,
  merges, special ids and chat template through gguf-py's vocab readers. llama.cpp also
  needs the *pre-tokenizer* (how text is split before BPE): it is recognised from the
  tokenizer's own description (``PRE_TOKENIZERS``) or given with ``pre=``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .gguf_task import GGUFError, _check_masks, _nbytes

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
QTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")

# what a tokenizer.json's pre-tokenizer splits text with -> llama.cpp's name for that split
# (names from llama.cpp's llama-vocab.cpp). Recognised by the regex of a Split step, or
# by the shape of the sequence (SmolLM: single digits, then GPT-2's byte-level regex).
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {"llama-bpe": "Llama 3 (a Split on its regex)", "qwen2": "Qwen2 (a Split on its regex)",
                  "smollm": "SmolLM (single digits, then byte-level)", "gpt-2": "GPT-2 (byte-level regex only)"}


class GGUFSourceError(GGUFError):
    """A checkpoint this writer cannot turn into a GGUF (architecture, rope, tokenizer)."""


class _Layer(NamedTuple):
    index: int
    width: int


@dataclass
class HFGGUFInfo:
    path: Path
    architecture: str
    widths: list[int]
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensors
    notes: list[str] = field(default_factory=list)
    bytes: int = 0


def _config(directory: Path) -> dict:
    try:
        return json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise GGUFSourceError(f"{directory / 'config.json'}: not readable ({e})") from None


def gguf_architecture_of(directory) -> str:
    """The GGUF architecture a checkpoint is written as; refuses the others by name."""
    directory = Path(directory)
    cfg = _config(directory)
    archs = cfg.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise GGUFSourceError(f"{directory}: architecture {archs or '(none in config.json)'} is not supported for "
                              f"GGUF output (supported: {', '.join(sorted(ARCHITECTURES))}); convert it with "
                              "llama.cpp's convert_hf_to_gguf.py and build from that GGUF")
    rope = _rope(cfg)[0]
    if rope not in ("default", "llama3"):
        raise GGUFSourceError(f"{directory}: rope scaling {rope!r} is not supported for GGUF output (none or llama3)")
    return arch


def _rope(cfg: dict) -> tuple[str, float]:
    """(rope type, theta) from a config of either spelling: ``rope_scaling`` + ``rope_theta``
    (checkpoints written by transformers 4) or ``rope_parameters`` (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    rope = scaling.get("rope_type", scaling.get("type", "default"))
    return rope, float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the way ``tokenizer.json`` splits text before BPE, or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    for s in steps:
        pattern = (s.get("pattern") or {}).get("Regex")
        if s.get("type") == "Split" and pattern == _LLAMA3_REGEX:
            return "llama-bpe"
        if s.get("type") == "Split" and pattern == _QWEN2_REGEX:
            return "qwen2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return None


def _tokenizer(directory: Path, pre: str | None, n_vocab: int | None = None):
    """(gguf-py BpeVocab, SpecialVocab, pre-tokenizer name) of a byte-level BPE tokenizer."""
    import gguf

    path = directory / "tokenizer.json"
    if not path.is_file():
        raise GGUFSourceError(f"{directory}: no tokenizer.json (GGUF output carries the tokenizer; a byte-level BPE "
                              "tokenizer.json is needed)")
    try:
        vocab = gguf.vocab.BpeVocab(directory)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise GGUFSourceError(f"{path}: not a byte-level BPE tokenizer this writer can carry over ({e or 'type'}); "
                              "convert the checkpoint with llama.cpp's convert_hf_to_gguf.py") from None
    if pre is None:
        pre = pre_tokenizer_name(json.loads(path.read_text()))
        if pre is None:
            raise GGUFSourceError(f"{path}: its pre-tokenizer is none this writer recognises "
                                  f"({', '.join(f'{k}: {v}' for k, v in PRE_TOKENIZERS.items())}); name llama.cpp's "
                                  "pre-tokenizer type with --gguf-pre (e.g. llama-bpe), or 'default' to let llama.cpp "
                                  "fall back to its default split (it warns that generation quality may degrade)")
    # special ids may lie past the tokenizer's own tokens, in the embedding's padding rows
    special = gguf.vocab.SpecialVocab(directory, load_merges=True, n_vocab=max(vocab.vocab_size, n_vocab or 0))
    if not special.merges:
        raise GGUFSourceError(f"{path}: no BPE merges found")
    return vocab, special, pre


def _reorder_for_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection from rotate-half order (dims i and i + d/2 of a head
    rotate together) to interleaved pairs (2i, 2i + 1), llama.cpp's llama rope."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_factors(cfg: dict) -> np.ndarray | None:
    """llama3 rope scaling as llama.cpp reads it: the divisor of each rotary frequency,
    taken from transformers' own computation of the scaled frequencies."""
    rope, theta = _rope(cfg)
    if rope != "llama3":
        return None
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.for_model(**cfg)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (base / scaled.double()).float().numpy()


def _gguf_name(name: str, arch_enum, blocks: int) -> str | None:
    import gguf

    return gguf.get_tensor_name_map(arch_enum, blocks).get_name(name, try_suffixes=(".weight", ".bias"))


def check_hf_source(directory, masks_list, *, qtype: str, pre: str | None = None) -> None:
    """Everything ``write_hf_task_gguf`` would refuse, checked before anything is written:
    the type, the architecture and rope, the tokenizer, and every task's masks."""
    directory = Path(directory)
    if qtype not in QTYPES:
        raise GGUFSourceError(f"GGUF type {qtype!r}: choose from {', '.join(QTYPES)}")
    gguf_architecture_of(directory)
    _tokenizer(directory, pre)
    for masks in masks_list:
        check_hf_masks(directory, masks)


def check_hf_masks(directory, masks) -> None:
    """One task's masks against the checkpoint's FFN widths (uniform, the right width)."""
    cfg = _config(Path(directory))
    layers = [_Layer(i, int(cfg["intermediate_size"])) for i in range(int(cfg["num_hidden_layers"]))]
    _check_masks(masks, layers, Path(directory))


def write_hf_task_gguf(directory, masks, out, *, qtype: str = "q8_0", pre: str | None = None,
                       task: str | None = None, progress=None) -> HFGGUFInfo:
    """Write the GGUF of checkpoint ``directory`` specialised to ``masks`` (one per layer:
    zeros drop a channel, other values scale it) with its 2-D weights in ``qtype``; norms,
    biases and rope factors stay float32. Atomic; the checkpoint is read one tensor at a time.

    A 2-D weight whose rows are not a multiple of ``qtype``'s block is written F16 (noted).
    ``progress(done, total)`` is called per tensor.
    """
    import gguf
    import torch

    from .weights import Checkpoint

    directory, out = Path(directory), Path(out)
    if qtype not in QTYPES:
        raise GGUFSourceError(f"GGUF type {qtype!r}: choose from {', '.join(QTYPES)}")
    arch = gguf_architecture_of(directory)
    cfg = _config(directory)
    vocab, special, pre = _tokenizer(directory, pre, int(cfg["vocab_size"]))
    ckpt = Checkpoint(directory)
    blocks = int(cfg["num_hidden_layers"])
    width = int(cfg["intermediate_size"])
    kept = _check_masks(masks, [_Layer(i, width) for i in range(blocks)], directory)
    task_width = int(kept[0][0].size)
    heads, kv_heads = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    target = gguf.GGMLQuantizationType[qtype.upper()]

    # plan every tensor first: GGUF headers list each tensor's final size before any data
    plan = []  # (gguf name, hf name, ggml type, shape [rows, cols] numpy order, how)
    for name in sorted(ckpt.tensors, key=lambda n: _tensor_order(n)):
        gname = _gguf_name(name, arch_enum, blocks)
        if gname is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise GGUFSourceError(f"{ckpt.info(name).file}: tensor {name} has no GGUF counterpart in the {arch} "
                                  "architecture (a model variant this writer does not know)")
        shape = list(ckpt.info(name).shape)
        how = None
        layer = _layer_of(gname)
        if gname.endswith(("ffn_gate.weight", "ffn_up.weight")):
            shape[0], how = task_width, ("rows", layer)
        elif gname.endswith("ffn_down.weight"):
            shape[1], how = task_width, ("down", layer)
        elif arch == "llama" and gname.endswith("attn_q.weight"):
            how = ("rope", heads)
        elif arch == "llama" and gname.endswith("attn_k.weight"):
            how = ("rope", kv_heads)
        qt = gguf.GGMLQuantizationType.F32
        if len(shape) == 2 and qtype != "f32":
            block = gguf.GGML_QUANT_SIZES[target][0]
            qt = target if shape[1] % block == 0 else gguf.GGMLQuantizationType.F16
        plan.append((gname, name, qt, shape, how))
    factors = _rope_factors(cfg)
    if factors is not None:
        plan.append(("rope_freqs.weight", None, gguf.GGMLQuantizationType.F32, [factors.size], ("const", factors)))
    info = HFGGUFInfo(out, arch, [task_width] * blocks)
    for gname, _, qt, shape, _ in plan:
        info.tensor_types[qt.name] = info.tensor_types.get(qt.name, 0) + 1
        if qt == gguf.GGMLQuantizationType.F16 and target != qt and len(shape) == 2:
            info.notes.append(f"{gname}: {shape[1]} columns are not a multiple of {qtype}'s block: written F16")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(cfg.get("_name_or_path") or directory.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(blocks)
        w.add_feed_forward_length(task_width)
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_rope_freq_base(_rope(cfg)[1])
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(_file_type(qtype))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        tokens, _, types = zip(*vocab.all_tokens())
        tokens, types = list(tokens), list(types)
        for i in range(len(tokens), int(cfg["vocab_size"])):  # embedding rows past the tokenizer: padding
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)
        if task is not None:
            w.add_string("ifp_compile.task", task)
        w.add_array("ifp_compile.kept_channels", info.widths)
        sizes = []
        for gname, _, qt, shape, _ in plan:
            nbytes = _nbytes(qt, list(reversed(shape)))
            sizes.append(nbytes)
            w.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (gname, name, qt, shape, how) in enumerate(plan):
            if how is not None and how[0] == "const":
                data = how[1]
            else:
                t = ckpt.read(name).to(torch.float32).numpy()
                if how is not None and how[0] == "rows":
                    t = t[kept[how[1]][0]]
                elif how is not None and how[0] == "down":
                    keep, scale = kept[how[1]]
                    t = t[:, keep] * scale[None, :]
                elif how is not None and how[0] == "rope":
                    t = _reorder_for_rope(t, how[1])
                data = gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), qt)
            if data.nbytes != sizes[i]:  # pragma: no cover - a planning bug, never a user's
                raise GGUFError(f"internal: {gname} is {data.nbytes} bytes, planned {sizes[i]}")
            w.write_tensor_data(data)
            info.bytes += data.nbytes
            if progress is not None:
                progress(i + 1, len(plan))
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def _layer_of(gname: str) -> int | None:
    parts = gname.split(".")
    return int(parts[1]) if parts[0] == "blk" else None


def _tensor_order(name: str):
    """Embedding first, then layers in order, then the rest (what llama.cpp's converter does)."""
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    if "embed_tokens" in name:
        return (0, 0, name)
    return (1, int(m.group(1)), name) if m else (2, 0, name)


def _file_type(qtype: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(
        qtype, f"MOSTLY_{qtype.upper()}")))

