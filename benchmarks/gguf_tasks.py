"""Per-task GGUF files of SmolLM2-135M-Instruct in llama.cpp: agreement and decode speed.

    python benchmarks/gguf_tasks.py [--reps 3] [--tokens 128]

Needs the ``gguf`` extra (xllamacpp: llama.cpp, CPU build) and the real model. In one run:

* **agreement**: teacher-forced top-1 agreement over 256 positions (4 chat prompts, 64
  positions of the dense GGUF's own greedy answer each) between llama.cpp running a GGUF
  and torch running the program it should equal: the source GGUF against the dense
  program on the same de-quantized weights (llama.cpp's own numerics: it quantizes
  activations to 8 bits for its quantized matmuls), and per-task GGUFs at keep 0.5 and
  0.75 against ``ifp.specialize`` of the same masks, for each way of storing ``ffn_down``
  (the one tensor the cut goes through: ``--gguf-down-type``). Teacher forcing compares
  every position on the same prefix, so one early disagreement does not decide the rest.
* **decode speed**: llama.cpp's own decode tokens/s, dense and per-task GGUFs, interleaved
  over ``--reps`` rounds (median), against the ideal ratio of weight bytes read per token
  (every tensor once, but the token embedding when the model has a separate output head).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("IFP_QUIET", "1")

import torch  # noqa: E402

import ifp_compile as ifp  # noqa: E402
from ifp_compile.generate import chat_ids  # noqa: E402
from ifp_compile.gguf_task import write_task_gguf  # noqa: E402
from ifp_compile.llamacpp import LlamaCpp, top1_agreement  # noqa: E402
from ifp_compile.predictors import PromptActivationPredictor  # noqa: E402
from ifp_compile.real_model import GGUF_FILE, load_smollm2, smollm2_dir  # noqa: E402

PROMPTS = ["What is 12 times 3? Explain your answer.", "Write a Python function that reverses a string.",
           "Give three tips for sleeping well.", "Translate 'good morning, my friend' into French."]
INSTRUCTION = "Answer the user's question helpfully and concisely."


def bytes_per_token(path) -> int:
    """Weight bytes a decode step reads: every tensor, but the embedding table when a
    separate ``output.weight`` exists (then a step reads one row of it)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="interleaved decode-speed rounds (default 3)")
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens per round (default 128)")
    p.add_argument("--positions", type=int, default=64, help="teacher-forced positions per prompt (default 64)")
    args = p.parse_args(argv)

    source = str(Path(smollm2_dir()) / GGUF_FILE)
    model, tok = load_smollm2()
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    with LlamaCpp(source) as llm:
        sequences = []
        for prompt in PROMPTS:
            ids = chat_ids(tok, prompt)[0].tolist()
            answer, _ = llm.greedy(ids, args.positions)
            sequences.append((len(ids), ids + answer))
        dense_agreement = top1_agreement(llm, ep, sequences)
    n = sum(len(s) - start for start, s in sequences)
    print(f"SmolLM2-135M-Instruct {GGUF_FILE}: teacher-forced top-1 agreement over {n} positions")
    print(f"  source GGUF in llama.cpp vs the dense torch program:              {dense_agreement:.3f}")

    work = Path(tempfile.mkdtemp(prefix="ifp-gguf-"))
    files = {"dense": source}
    for keep in (0.5, 0.75):
        pred = PromptActivationPredictor(ep, keep=keep)
        masks = pred(tok(INSTRUCTION, return_tensors="pt")["input_ids"])
        small = ifp.specialize(ep, mask=masks)
        for down in ("auto", "source", "f32"):
            path = work / f"keep{keep}-{down}.gguf"
            info = write_task_gguf(source, [m.numpy() for m in masks], path, down_type=down)
            files[f"keep {keep}, ffn_down {info.down_types[0]}"] = str(path)
            with LlamaCpp(path) as llm:
                a = top1_agreement(llm, small, sequences)
            label = f"keep {keep} task GGUF (ffn_down {info.down_types[0]}, --gguf-down-type {down})"
            print(f"  {label:<58} vs ifp.specialize: {a:.3f}   {path.stat().st_size / 1e6:.1f} MB")

    print(f"\ndecode tokens/s in llama.cpp (2 threads, {args.tokens} tokens, median of {args.reps} interleaved rounds)")
    speed_files = {k: v for k, v in files.items() if k == "dense" or "Q8_0" in k or "Q4_1" in k}
    llms = {k: LlamaCpp(v) for k, v in speed_files.items()}
    prompt = chat_ids(tok, PROMPTS[0])[0].tolist()
    rates: dict[str, list[float]] = {k: [] for k in llms}
    for _ in range(args.reps):
        for k, llm in llms.items():
            rates[k].append(llm.greedy(prompt, args.tokens)[1].decode_tokens_per_s)
    dense_rate, dense_bytes = statistics.median(rates["dense"]), bytes_per_token(source)
    print(f"  {'file':<28} {'tokens/s':>9} {'speed-up':>9} {'ideal':>7} {'of ideal':>9}   weight MB/token")
    for k in llms:
        r = statistics.median(rates[k])
        ideal = dense_bytes / bytes_per_token(speed_files[k])
        print(f"  {k:<28} {r:>9.1f} {r / dense_rate:>8.2f}x {ideal:>6.2f}x {r / dense_rate / ideal:>9.2f}"
              f"   {bytes_per_token(speed_files[k]) / 1e6:.1f}")


if __name__ == "__main__":
    main()
