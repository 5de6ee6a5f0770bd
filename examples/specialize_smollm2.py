"""The public API end to end on SmolLM2-135M-Instruct, without the demo's table.

    python examples/specialize_smollm2.py [OUT_DIR]

Exports the model, inserts the training-free prompt-activation predictor, specializes
for one instruction, checks the small program against the masked reference, saves it
with ``torch.export.save`` (no pickles: weights are loaded weights-only) and loads it back.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import ifp_compile as ifp
from ifp_compile.generate import chat_ids, greedy_generate
from ifp_compile.predictors import PromptActivationPredictor
from ifp_compile.real_model import load_smollm2


def main(out_dir: str) -> None:
    model, tok = load_smollm2()
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    print(f"{len(ifp.find_ffn_blocks(ep))} FFN blocks; dense parameters {ifp.count_parameters(ep):,}")

    instruction = "Write a Python function that returns the factorial of a number n."
    prog = ifp.insert_masks(ep, predictor=PromptActivationPredictor(ep, keep=0.75))
    small = ifp.specialize(prog, instruction, tokenizer=tok)
    print(f"specialized parameters {ifp.count_parameters(small):,}")

    # the small dense program equals the masked reference evaluated with the predicted masks
    blocks = ifp.find_ffn_blocks(prog)
    masks = ifp.predict_masks(prog, blocks, tok(instruction, return_tensors="pt")["input_ids"])
    ids = chat_ids(tok, instruction)
    reference = ifp.specialize(ifp.insert_masks(ep), mask=masks)  # same masks, mask-input route
    err = (small.module()(ids) - reference.module()(ids)).abs().max().item()
    print(f"max |specialized - reference| on the prompt's logits: {err:.2e}")

    path = os.path.join(out_dir, "smollm2-factorial.pt2")
    torch.export.save(small, path)
    loaded = torch.export.load(path)
    answer = greedy_generate(loaded.module(), ids, 40, tok.eos_token_id)
    print(f"saved {path} ({os.path.getsize(path) / 2**20:.0f} MiB); answer from the loaded program:")
    print(tok.decode(answer, skip_special_tokens=True))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        os.makedirs(sys.argv[1], exist_ok=True)
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as d:
            main(d)
