"""Run a GGUF file in llama.cpp (through the ``xllamacpp`` wheel: the ``gguf`` extra).

    from ifp_compile.llamacpp import LlamaCpp
    with LlamaCpp("math.gguf") as llm:
        ids, timing = llm.greedy([1, 504, 3458], 32)
        timing.decode_tokens_per_s

Used to check per-task GGUF files where users run them (tests, the demo, benchmarks):
greedy token ids and llama.cpp's own decode timings, no sampling, no chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import IFPError

INSTALL_HINT = "pip install 'ifp-compile[gguf]' (the xllamacpp wheel: llama.cpp, CPU build)"


@dataclass(frozen=True)
class Timing:
    """llama.cpp's own timings of one completion."""

    prompt_tokens: int
    prompt_ms: float
    decode_tokens: int
    decode_ms: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 * self.decode_tokens / self.decode_ms if self.decode_ms else float("nan")


class LlamaCpp:
    """One GGUF file loaded in llama.cpp (CPU), answering greedy completions."""

    def __init__(self, path, *, n_ctx: int = 512, threads: int = 2):
        try:
            import xllamacpp
        except ImportError:
            raise IFPError(f"running GGUF files needs llama.cpp: {INSTALL_HINT}") from None
        path = Path(path)
        if not path.is_file():
            raise IFPError(f"GGUF file {path} does not exist")
        p = xllamacpp.CommonParams()
        p.model.path = str(path)
        p.n_ctx = n_ctx
        p.n_parallel = 1
        p.cpuparams.n_threads = threads
        p.cpuparams_batch.n_threads = threads
        p.warmup = False
        p.verbosity = -1
        try:
            self._server = xllamacpp.Server(p)
        except RuntimeError as e:
            raise IFPError(f"llama.cpp could not load {path}: {e} (its log above says why)") from None
        self.path = path

    def greedy(self, prompt_ids, n: int) -> tuple[list[int], Timing]:
        """``n`` greedy tokens after ``prompt_ids`` (no BOS added), and the timings."""
        r = self._complete(prompt_ids, n, cache_prompt=False)
        ids = [int(c["id"]) for c in r["choices"][0]["logprobs"]["content"]]
        t = r["timings"]
        return ids, Timing(int(t["prompt_n"]), float(t["prompt_ms"]), int(t["predicted_n"]), float(t["predicted_ms"]))

    def _complete(self, prompt_ids, n: int, *, cache_prompt: bool) -> dict:
        """One greedy completion request, with each generated token's id in ``logprobs``."""
        r = self._server.handle_completions({
            "prompt": [int(i) for i in prompt_ids], "n_predict": int(n), "temperature": 0.0, "top_k": 1,
            "logprobs": 1, "cache_prompt": cache_prompt, "ignore_eos": True})
        if "error" in r:
            raise IFPError(f"llama.cpp failed on {self.path}: {r['error']}")
        return r

    def next_tokens(self, ids, start: int) -> list[int]:
        """llama.cpp's greedy next token after each prefix ``ids[:i]``, ``start <= i < len(ids)``
        (teacher forcing: each prefix is the given text, never llama.cpp's own output; the
        prompt cache makes each step one token of work)."""
        out = []
        for i in range(start, len(ids)):
            r = self._complete(ids[:i], 1, cache_prompt=True)
            out.append(int(r["choices"][0]["logprobs"]["content"][0]["id"]))
        return out

    def close(self) -> None:
        self._server = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def top1_agreement(llm: LlamaCpp, program, sequences) -> float:
    """Teacher-forced top-1 agreement between llama.cpp and an exported ``program``.

    ``sequences`` are ``(start, ids)`` pairs; at every position ``start <= i < len(ids)``
    llama.cpp's greedy next token after ``ids[:i]`` is compared with the argmax of the
    program's logits there. Every position sees the same prefix in both, so one early
    disagreement does not decide the rest (as it would comparing free greedy decodes).
    """
    import torch

    agree = total = 0
    for start, ids in sequences:
        theirs = llm.next_tokens(ids, start)
        with torch.no_grad():
            ours = program.module()(torch.tensor([list(ids)]))[0, start - 1:len(ids) - 1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(theirs, ours))
        total += len(ours)
    return agree / total
