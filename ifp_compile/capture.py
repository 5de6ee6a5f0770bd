"""Capture a model as a ``torch.export`` program.

Why a wrapper: a Hugging Face causal LM returns a ``ModelOutput`` with a KV cache;
the compiler wants a pure function ``input_ids -> logits`` so that every pass sees
one tensor output and no cache state. Plain ``nn.Module`` s are exported as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ProgramError
from .progress import status
from .weights.lazy import export_weightless


class CausalLMLogits(nn.Module):
    """``input_ids -> logits`` view of a Hugging Face causal LM (cache off).

    The wrapped model is stored as ``lm``, so parameter names in the exported
    program read ``lm.model.layers.0.mlp.down_proj.weight``.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def is_hf_causal_lm(model: nn.Module) -> bool:
    """True for a ``transformers`` model with a causal-LM head (duck-typed: no import)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        return False
    return hasattr(model, "generation_config") and model.get_output_embeddings() is not None


def seq_dynamic_shapes(example_args: tuple, *, max_len: int | None = None) -> tuple:
    """``dynamic_shapes`` marking dim 1 (sequence) of the first argument as dynamic."""
    seq = torch.export.Dim("seq", min=2, max=max_len or 4096)
    return ({1: seq},) + (None,) * (len(example_args) - 1)


def export(
    model: nn.Module,
    example_args: tuple[Any, ...],
    dynamic_shapes: Any = None,
    *,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Export ``model`` with ``torch.export`` in eval mode.

    A model whose parameters are on the meta device (built from a config, its weights in a
    checkpoint) exports as a weightless program (``weights.lazy``); see
    :func:`export_checkpoint`. Hugging Face causal LMs are wrapped by :class:`CausalLMLogits` (logits only, no KV
    cache). ``dynamic_shapes`` is passed to ``torch.export.export`` unchanged; the
    string ``"seq"`` is a shortcut for a dynamic sequence dimension on the first input.
    """
    if not isinstance(model, nn.Module):
        raise ProgramError(f"export() takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_args, tuple):
        raise ProgramError(
            "export(): example_args must be a tuple of example inputs, e.g. (input_ids,); "
            f"got {type(example_args).__name__}"
        )
    target = CausalLMLogits(model) if is_hf_causal_lm(model) else model
    if dynamic_shapes == "seq":
        dynamic_shapes = seq_dynamic_shapes(example_args)
    was_training = model.training
    model.eval()
    try:
        with status(f"exporting {type(model).__name__} with torch.export"), torch.no_grad():
            return export_weightless(target, example_args, dynamic_shapes=dynamic_shapes, strict=strict)
    finally:
        model.train(was_training)


def _checkpoint_dtype(config, checkpoint) -> torch.dtype:
    """The dtype the checkpoint's config declares, else the dtype of its floating tensors."""
    from .dtypes import SUPPORTED

    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype) and declared in SUPPORTED:
        return declared
    stored = {t.dtype for t in checkpoint.tensors.values() if t.dtype.is_floating_point}
    return stored.pop() if len(stored) == 1 and next(iter(stored), None) in SUPPORTED else torch.float32


def build_skeleton(directory, dtype=None):
    """(model with weightless parameters, checkpoint, dtype) for a Hugging Face checkpoint directory.

    The model is built from ``config.json`` with its parameters on the meta device and its
    buffers real (rotary frequencies are computed from the config, not stored); every
    parameter gets a recipe pointing at its tensor in the checkpoint, after checking that
    the tensor exists with the parameter's shape (errors name the tensor and the file).
    Persistent buffers stored in the checkpoint are read (they are small).
    """
    from collections import defaultdict

    from .dtypes import parse_dtype
    from .weights.checkpoint import Checkpoint, CheckpointError
    from .weights.lazy import LazyWeight, lazy_parameter

    checkpoint = Checkpoint(directory)
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ProgramError("capturing a checkpoint needs the 'hf' extra: pip install 'ifp-compile[hf]'") from e
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many kinds for a bad config
        raise CheckpointError(f"{checkpoint.directory / 'config.json'}: not a config transformers can read ({e})") from None
    dtype = parse_dtype(dtype) if dtype is not None else _checkpoint_dtype(config, checkpoint)
    config._attn_implementation = "sdpa"
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise CheckpointError(f"{checkpoint.directory}: transformers cannot build a causal LM from its config ({e})") from None
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights (lm_head = embedding) apart
    model.eval()
    names = defaultdict(list)
    params = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(fqn)
        params[id(p)] = p
    arch = type(model).__name__
    for key, p in params.items():
        found = next((n for n in names[key] if n in checkpoint), None)
        if found is None:
            raise CheckpointError(f"{checkpoint.directory}: parameter {names[key][0]} of {arch} is in no shard "
                                  f"(shape {list(p.shape)}; an incomplete checkpoint, or one of another model?)")
        checkpoint.check(found, tuple(p.shape), what=f"parameter {found} of {arch}")
        if not checkpoint.info(found).dtype.is_floating_point:
            raise CheckpointError(f"{checkpoint.info(found).file}: tensor {found} is stored as "
                                  f"{checkpoint.info(found).dtype}; ifp-compile reads floating-point weights only")
        lazy = lazy_parameter(LazyWeight(checkpoint, found, dtype, tuple(p.shape)), requires_grad=p.requires_grad)
        for fqn in names[key]:
            owner_path, _, attr = fqn.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            owner._parameters[attr] = lazy
    for fqn, b in model.named_buffers():
        if fqn in checkpoint:
            owner_path, _, attr = fqn.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            stored = checkpoint.read(fqn)
            checkpoint.check(fqn, tuple(b.shape), what=f"buffer {fqn} of {arch}")
            owner._buffers[attr] = stored.to(b.dtype)
    return model, checkpoint, dtype


def export_checkpoint(directory, *, dtype=None, max_len: int | None = None) -> torch.export.ExportedProgram:
    """Capture a Hugging Face checkpoint directory as a weightless ``input_ids -> logits`` program.

    ``directory`` holds ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``). No weight is read: every parameter of the result is
    on the meta device with a recipe naming its checkpoint tensor (``weights.lazy``), so
    discovery, ``insert_masks`` and ``specialize`` run on it at any model size, and
    ``ifp_compile.save`` streams the (kept slices of the) weights into an artifact.
    ``dtype`` (default: the config's ``torch_dtype``) is what the program computes in;
    weights stored in another dtype are converted when read. The sequence length is
    dynamic, up to ``max_len`` (default 4096).
    """
    model, _, _ = build_skeleton(directory, dtype)
    example = torch.zeros(1, 8, dtype=torch.long)
    return export(model, (example,), dynamic_shapes=seq_dynamic_shapes((example,), max_len=max_len))
