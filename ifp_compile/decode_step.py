"""Decode-step programs: new tokens in, logits out, a static KV cache inside the program.

``ifp.export`` captures ``input_ids -> logits`` over the whole prefix: the right shape for
the masked reference and the specialisation proofs, but decoding with it re-runs the
prefix for every token. A decode-step program holds the KV cache as state tensors that
each call updates in place (the ExecuTorch recipe, built here on transformers'
``TorchExportableModuleWithStaticCache``), so a call costs only its new tokens. It is
an ordinary ExportedProgram: ``find_ffn_blocks`` finds the same blocks in it,
``insert_masks`` gives its masked reference and ``specialize`` shrinks it, so a task's
artifact can be a program that decodes at the speed of a small dense model.

The inputs are positional ``(input_ids [1, n], cache_position [n])``; ``n`` is dynamic
(1 to ``max_cache_len``) unless ``prompt_chunks=False``, which gives a one-token step
(what a minimal runtime such as ExecuTorch's simple runner calls).
"""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.export import ExportedProgram

from .capture import is_hf_causal_lm
from .errors import InstructionError, ProgramError
from .graph_utils import user_input_nodes
from .progress import status


class _Step(nn.Module):
    """Positional ``(input_ids, cache_position) -> logits`` over transformers' static-cache
    wrapper (which takes keywords only): positional inputs are what ``insert_masks`` and
    ONNX export expect."""

    def __init__(self, wrapper: nn.Module):
        super().__init__()
        self.wrapper = wrapper

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        return self.wrapper(input_ids=input_ids, cache_position=cache_position)


def export_decode_step(model: nn.Module, max_cache_len: int, *, prompt_chunks: bool = True) -> ExportedProgram:
    """Export one decoding step of the Hugging Face causal LM ``model`` with a static KV
    cache of ``max_cache_len`` positions (batch 1)."""
    if not is_hf_causal_lm(model):
        raise ProgramError(
            f"export_decode_step() needs a transformers causal LM (a KV cache it knows how to build); "
            f"got {type(model).__name__}"
        )
    if not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise ProgramError(f"max_cache_len must be an integer >= 2, got {max_cache_len!r}")
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    gen = model.generation_config
    saved = gen.cache_implementation
    was_training = model.training
    model.eval()
    gen.cache_implementation = "static"  # the wrapper insists on it; restored below
    try:
        step = _Step(TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_cache_len))
        n = 2 if prompt_chunks else 1
        example = (torch.zeros(1, n, dtype=torch.long), torch.arange(n))
        dynamic = None
        if prompt_chunks:
            seq = torch.export.Dim("tokens", min=1, max=max_cache_len)
            dynamic = ({1: seq}, {0: seq})
        with status(f"exporting a decode step of {type(model).__name__} (KV cache of {max_cache_len})"), torch.no_grad():
            return torch.export.export(step, example, dynamic_shapes=dynamic, strict=False)
    finally:
        gen.cache_implementation = saved
        model.train(was_training)


def _cache_placeholders(program: ExportedProgram) -> list:
    """Placeholders of the state the program updates in place (KV cache and its length).

    The transformers wrapper registers the cache as buffers, but the cache object's own
    references are what the export sees: they are lifted as constant tensors that the
    graph updates with ``index_copy_``/``copy_``. Either way they are the first argument
    of an in-place op on a placeholder, which is how they are found here.
    """
    found = []
    for n in program.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable:
            target = n.args[0]
            if isinstance(target, torch.fx.Node) and target.op == "placeholder" and target not in found:
                found.append(target)
    return found


def max_cache_len(program: ExportedProgram) -> int:
    """The KV-cache length a decode-step program was exported with: the positions axis of
    its [batch, heads, positions, head_dim] cache tensors."""
    for ph in _cache_placeholders(program):
        if ph.meta["val"].ndim == 4:
            return int(ph.meta["val"].shape[2])
    raise ProgramError("not a decode-step program: no KV cache updated in place "
                       "(a [batch, heads, positions, head_dim] tensor; see export_decode_step)")


def _own_state(module: nn.Module, program: ExportedProgram) -> None:
    """Give ``module`` private copies of the cache tensors: programs derived from one
    export (dense, masked, specialised) share them otherwise, and two decoders running
    at once would overwrite each other's cache."""
    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    for ph in _cache_placeholders(program):
        owner, _, attr = specs[ph.name].target.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        setattr(holder, attr, getattr(holder, attr).clone())


def _one_token_only(program: ExportedProgram) -> bool:
    return user_input_nodes(program)[0].meta["val"].shape[1] == 1


class StepDecoder:
    """Greedy decoding with a decode-step program, or with a callable built from one
    (``torch.compile(program.module())``): the caller chooses the runtime, the loop and
    the cache bookkeeping are the same for every program compared.

    ``extra`` are appended to every call (e.g. the ``ffn_masks`` of a masked program).
    """

    def __init__(self, program: ExportedProgram, run=None, extra: tuple = ()):
        self.length = max_cache_len(program)
        self.one_token = _one_token_only(program)
        self.module = program.module()
        _own_state(self.module, program)
        self.run = run(self.module) if run is not None else self.module
        self.extra = tuple(extra)

    def _call(self, fn, ids: torch.Tensor, start: int) -> torch.Tensor:
        return fn(ids, torch.arange(start, start + ids.shape[1]), *self.extra)

    def greedy(self, prompt_ids: torch.Tensor, new_tokens: int, eos_token_id: int | None = None) -> tuple[list[int], float]:
        """The greedy continuation of ``prompt_ids`` ([1, T]) and the decode speed in tokens/s
        (the prompt is not timed: prefill runs uncompiled, in one call unless the program
        takes one token at a time)."""
        return greedy_with_cache(lambda ids, start: self._call(self.module, ids, start),
                                 lambda ids, start: self._call(self.run, ids, start),
                                 prompt_ids, new_tokens, eos_token_id, capacity=self.length, one_token=self.one_token)


@torch.inference_mode()
def greedy_with_cache(prefill, step, prompt_ids: torch.Tensor, new_tokens: int, eos_token_id: int | None, *,
                      capacity: int, one_token: bool) -> tuple[list[int], float]:
    """The greedy decoding loop every decode-step runtime shares (torch, ExecuTorch).

    ``prefill(ids, start)`` and ``step(ids, start)`` return logits ``[1, n, vocab]`` for the
    tokens ``ids`` ([1, n]) at positions ``start ..``; the cache is theirs. Returns the new
    tokens (at most ``new_tokens``, ending at EOS when it comes) and the decode speed in
    tokens/s, the prompt not counted.
    """
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise InstructionError(f"prompt_ids must be [1, T] with T >= 1, got shape {list(prompt_ids.shape)}")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise InstructionError(f"new_tokens must be an integer >= 1, got {new_tokens!r}")
    t = prompt_ids.shape[1]
    if t + new_tokens - 1 > capacity:
        raise InstructionError(
            f"{t} prompt + {new_tokens} new tokens need {t + new_tokens - 1} cache positions; "
            f"the program's KV cache holds {capacity}"
        )
    if one_token:
        for i in range(t):
            logits = prefill(prompt_ids[:, i:i + 1], i)
    else:
        logits = prefill(prompt_ids, 0)
    nxt = logits[:, -1:].argmax(-1)
    tokens = [int(nxt)]
    start = time.perf_counter()
    for i in range(new_tokens - 1):
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        nxt = step(nxt, t + i)[:, -1:].argmax(-1)
        tokens.append(int(nxt))
    elapsed = time.perf_counter() - start
    return tokens, (len(tokens) - 1) / elapsed if elapsed > 0 else float("inf")
