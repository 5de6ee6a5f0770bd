"""ExecuTorch programs (``.pte``) of decode-step programs, lowered with XNNPACK, and the
greedy decoder that runs them in ExecuTorch's runtime (the ``pte`` extra).

    step = ifp.export_decode_step(model, max_cache_len=512)
    small = ifp.specialize(step, mask=masks)           # the task's decode step
    write_pte(small, "math/model.pte")                  # cache as mutable buffers, XNNPACK
    tokens, tok_per_s = PteDecoder("math/model.pte").greedy(prompt_ids, 64, eos)

Why a decode step and not the logits program: on a device a model decodes one token at a
time with its KV cache; ExecuTorch keeps that cache as the method's mutable buffers, so a
loaded method is one conversation's state and each call costs only its new tokens.

Precision: float32 and float16 programs have their matrix products delegated to XNNPACK;
bfloat16 lowers and runs but XNNPACK takes none of its matrix products (they fall back to
ExecuTorch's portable kernels, measured), so ``check_pte_dtype`` refuses it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.export import ExportedProgram

from .errors import IFPError, ProgramError
from .progress import status

INSTALL_HINT = "pip install 'ifp-compile[pte]' (executorch==1.5.1, which matches torch 2.13.0)"
PTE_DTYPES = (torch.float32, torch.float16)


class PteError(IFPError):
    """An ExecuTorch program that cannot be written or run."""


def _executorch():
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise PteError(f"ExecuTorch programs need executorch: {INSTALL_HINT}") from None


def check_pte_dtype(dtype: torch.dtype, where: str = "the program") -> None:
    """Refuse precisions XNNPACK would not accelerate (the program would run, slowly)."""
    if dtype not in PTE_DTYPES:
        raise PteError(f"{where} computes in {str(dtype).removeprefix('torch.')}: ExecuTorch's XNNPACK backend "
                       "delegates float32 and float16 matrix products only (bfloat16 ones fall back to portable "
                       "kernels); lower it in float32 or float16 (--dtype)")


def _program_dtype(program: ExportedProgram) -> torch.dtype:
    from .program_weights import parameters

    floats = {t.dtype for t in parameters(program).values() if t.is_floating_point()}
    if len(floats) != 1:
        raise ProgramError(f"the program's parameters mix dtypes {sorted(map(str, floats))}")
    return floats.pop()


def lower_to_pte(program: ExportedProgram) -> bytes:
    """The ExecuTorch program (``.pte`` bytes) of a decode-step program, XNNPACK-delegated.

    The same program gives the same bytes (checked in the tests), so build outputs stay
    deterministic. Lowering is graph work in Python: about 20 s for a 2-layer toy model,
    minutes for a 30-layer one.
    """
    _executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    from .passes.cache_as_buffers import cache_as_buffers
    from .weights import is_weightless

    if is_weightless(program):
        raise PteError("the program is weightless (captured from a checkpoint without its weights): ExecuTorch "
                       "embeds the weights in the .pte, so materialize it first (ifp_compile.materialize)")
    check_pte_dtype(_program_dtype(program))
    prepared = cache_as_buffers(program)
    with status("lowering to ExecuTorch (XNNPACK)"):
        edge = to_edge_transform_and_lower(prepared, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False))
        # the configuration of ExecuTorch's own LLM export: delegate data in segments,
        # inputs not planned into the arena, upper bounds for the dynamic token count
        return edge.to_executorch(ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass(),
        )).buffer


def write_pte(program: ExportedProgram, path) -> str:
    """Lower ``program`` and write its ``.pte`` atomically; returns the file's sha256."""
    import hashlib

    from .artifacts import atomic_write

    data = lower_to_pte(program)
    atomic_write(Path(path), data)
    return hashlib.sha256(data).hexdigest()


class PteDecoder:
    """Greedy decoding of a ``.pte`` decode-step program in ExecuTorch's runtime.

    The KV cache lives in the loaded method's buffers: one decoder is one cache. Each
    ``greedy`` call starts at position 0, so earlier entries are overwritten, never read
    (the causal mask covers only positions up to the current one).
    """

    def __init__(self, path, *, max_cache_len: int, one_token: bool = False):
        _executorch()
        from executorch.runtime import Runtime

        path = Path(path)
        if not path.is_file():
            raise PteError(f"ExecuTorch program {path} does not exist")
        try:
            self._program = Runtime.get().load_program(str(path))
            self._method = self._program.load_method("forward")
        except Exception as e:  # the runtime raises RuntimeError/ValueError with its own codes
            raise PteError(f"ExecuTorch could not load {path}: {e}") from None
        self.path, self.length, self.one_token = path, max_cache_len, one_token

    def _step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        return self._method.execute([ids, torch.arange(start, start + ids.shape[1])])[0]

    def greedy(self, prompt_ids: torch.Tensor, new_tokens: int, eos_token_id: int | None = None) -> tuple[list[int], float]:
        """The greedy continuation of ``prompt_ids`` ([1, T]) and the decode speed in tokens/s."""
        from .decode_step import greedy_with_cache

        return greedy_with_cache(self._step, self._step, prompt_ids.long(), new_tokens, eos_token_id,
                                 capacity=self.length, one_token=self.one_token)
