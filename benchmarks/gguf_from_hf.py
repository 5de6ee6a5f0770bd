"""Task GGUFs written from Hugging Face checkpoints (``--gguf-type``): agreement and scale.

    python benchmarks/gguf_from_hf.py [--positions 64]            # SmolLM2, in-process
    python benchmarks/gguf_from_hf.py --scale DIR [--qtype q8_0]  # a big checkpoint, alone

Needs the ``gguf`` extra (xllamacpp) and the real model.

* **agreement** (default): SmolLM2-135M-Instruct de-quantized into float32 and saved as a
  Hugging Face directory (``save_pretrained``, tokenizer included), then keep-0.5 task
  GGUFs written from it in f32, f16, q8_0 and q4_0: teacher-forced top-1 agreement over
  256 positions (4 chat prompts, 64 positions of the source GGUF's own greedy answer each)
  between llama.cpp running the task GGUF and ``ifp.specialize`` of the same mask on the
  same weights; writing time and file size. f32 measures the writer (same weights, so
  only llama.cpp's own arithmetic differs); the others add their quantization.
* **scale** (``--scale DIR``): one keep-0.5 task GGUF from a checkpoint of real shape (e.g.
  the random bf16 Llama-3.2-1B ``benchmarks/checkpoints.py`` writes; the tokenizer is
  SmolLM2's, linked in, the vocabulary padded to the model's), the time, the file size and
  this process's peak RSS against the largest tensor: the checkpoint is read one tensor at
  a time, so the peak stays near the biggest tensor in float32, not the model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("IFP_QUIET", "1")

import numpy as np  # noqa: E402


def save_as_checkpoint(model, directory: Path) -> None:
    """``model`` as a Hugging Face directory (config.json + model.safetensors). Written by
    hand: transformers refuses ``save_pretrained`` for a model loaded from a quantized GGUF."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, default=str))


def agreement(positions: int) -> None:
    import torch

    import ifp_compile as ifp
    from benchmarks.gguf_tasks import INSTRUCTION, PROMPTS
    from ifp_compile.generate import chat_ids
    from ifp_compile.gguf_from_hf import write_hf_task_gguf
    from ifp_compile.llamacpp import LlamaCpp, top1_agreement
    from ifp_compile.predictors import PromptActivationPredictor
    from ifp_compile.real_model import GGUF_FILE, load_smollm2, smollm2_dir

    model, tok = load_smollm2()
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    work = Path(tempfile.mkdtemp(prefix="ifp-gguf-hf-"))
    try:
        save_as_checkpoint(model, work / "hf")
        tok.save_pretrained(work / "hf")
        with LlamaCpp(Path(smollm2_dir()) / GGUF_FILE) as llm:
            sequences = []
            for prompt in PROMPTS:
                ids = chat_ids(tok, prompt)[0].tolist()
                sequences.append((len(ids), ids + llm.greedy(ids, positions)[0]))
        masks = PromptActivationPredictor(ep, keep=0.5)(tok(INSTRUCTION, return_tensors="pt")["input_ids"])
        small = ifp.specialize(ep, mask=masks)
        n = sum(len(s) - start for start, s in sequences)
        print(f"SmolLM2-135M-Instruct as a Hugging Face directory (float32), keep-0.5 task GGUFs written from it: "
              f"teacher-forced top-1 agreement with ifp.specialize over {n} positions")
        for qtype in ("f32", "f16", "q8_0", "q4_0"):
            t0 = time.perf_counter()
            info = write_hf_task_gguf(work / "hf", [m.numpy() for m in masks], work / f"{qtype}.gguf", qtype=qtype)
            took = time.perf_counter() - t0
            with LlamaCpp(work / f"{qtype}.gguf") as llm:
                a = top1_agreement(llm, small, sequences)
            print(f"  --gguf-type {qtype:<5} agreement {a:.3f}   {info.bytes / 1e6:7.1f} MB of tensors   written in "
                  f"{took:5.1f} s   pre-tokenizer from tokenizer.json: "
                  f"{__import__('gguf').GGUFReader(work / f'{qtype}.gguf').fields['tokenizer.ggml.pre'].contents()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def scale(directory: Path, qtype: str) -> None:
    from ifp_compile.gguf_from_hf import write_hf_task_gguf
    from ifp_compile.real_model import smollm2_dir
    from ifp_compile.weights import Checkpoint

    cfg = json.loads((directory / "config.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="ifp-gguf-scale-"))
    try:
        src = work / "ckpt"
        src.mkdir()
        for f in directory.iterdir():  # the checkpoint's files linked, SmolLM2's tokenizer beside them
            (src / f.name).symlink_to(f.resolve())
        from transformers import AutoTokenizer

        from ifp_compile.real_model import GGUF_FILE

        AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF_FILE).save_pretrained(src)
        ckpt = Checkpoint(src)
        largest = max(t.nbytes * 4 // t.dtype.itemsize for t in ckpt.tensors.values())  # float32 copy of it
        total = sum(t.nbytes for t in ckpt.tensors.values())
        width = int(cfg["intermediate_size"])
        g = np.random.default_rng(0)
        masks = []
        for _ in range(int(cfg["num_hidden_layers"])):
            m = np.zeros(width, np.float32)
            m[g.permutation(width)[: width // 2]] = 1.0
            masks.append(m)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        info = write_hf_task_gguf(src, masks, work / "task.gguf", qtype=qtype)
        took = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"{directory.name}: checkpoint {total / 2**30:.2f} GiB, keep-0.5 task GGUF ({qtype}) "
              f"{info.bytes / 2**30:.2f} GiB written in {took:.1f} s")
        print(f"  peak RSS {peak / 2**30:.2f} GiB (before writing {before / 2**30:.2f} GiB); largest tensor as float32 "
              f"{largest / 2**30:.2f} GiB; notes: {info.notes[:2] or 'none'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", type=int, default=64, help="teacher-forced positions per prompt (default 64)")
    p.add_argument("--scale", type=Path, help="a big Hugging Face checkpoint directory: measure only it")
    p.add_argument("--qtype", default="q8_0", help="with --scale: the GGUF type (default q8_0)")
    args = p.parse_args(argv)
    if args.scale:
        scale(args.scale, args.qtype)
    else:
        agreement(args.positions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
