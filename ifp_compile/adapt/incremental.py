"""The incremental schedule (Adapt-Accel): prune a little, train, repeat.

Training between pruning steps reuses the trainer of ``ifp_compile.train`` unchanged: the
"predictor" is a module that returns the step's fixed masks, the LLM trains through the
masked reference program (``insert_masks(ep, heads=...)``, the same math ``specialize``
folds), and a masked channel gets no gradient, so this trains exactly the pruned model.
Each step's run starts a fresh optimizer with its own data order (seed + step) and
writes its checkpoint to a scratch directory that is removed afterwards.

Also here: reading calibration text (JSONL ``{"text": ...}``) into token chunks, with the
errors the ``prune`` command promises (too little text for the model, bad lines).
"""

from __future__ import annotations

import shutil
import tempfile

import torch
from torch import nn

from ..errors import IFPError
from ..progress import quiet
from ..train.config import TrainConfig
from ..train.data import encode, read_jsonl


class FixedMasks(nn.Module):
    """A "predictor" with no parameters: the same masks for every example."""

    vocab_size = None

    def __init__(self):
        super().__init__()
        self.head = nn.Module()  # the trainer's from-scratch parameter group: empty
        self.masks: tuple = ()

    def forward(self, ids):  # noqa: ARG002 - every example gets the step's masks
        return self.masks

    def config(self) -> dict:
        return {"fixed_masks": True}


class _Unpack(nn.Module):
    """``lm(ids, (ffn_masks, head_masks))`` -> the masked program's ``(ids, ffn, heads)``."""

    def __init__(self, program_module: nn.Module):
        super().__init__()
        self.program = program_module

    def forward(self, ids, masks):
        return self.program(ids, *masks)


def calibration_chunks(path, tokenizer, *, chunk_tokens: int = 256, max_chunks: int = 16) -> list[torch.Tensor]:
    """Token chunks ``[1, chunk_tokens]`` from a JSONL file of ``{"text": ...}`` records."""
    ids: list[int] = []
    for lineno, record in read_jsonl(path):
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise IFPError(f"{path}:{lineno}: expected an object with a \"text\" string")
        ids += encode(tokenizer, text)
        if len(ids) >= chunk_tokens * max_chunks:
            break
    n = min(len(ids) // chunk_tokens, max_chunks)
    if n == 0:
        raise IFPError(f"calibration data {path} is too short: {len(ids)} tokens, the model needs at least one chunk "
                       f"of {chunk_tokens} tokens (give more text or a smaller --chunk-tokens)")
    return [torch.tensor([ids[i * chunk_tokens:(i + 1) * chunk_tokens]]) for i in range(n)]


def trainer_hook(model: nn.Module, tokenizer, program, masked, data, *, steps: int, lr: float = 1e-5,
                 batch_size: int = 4, chunk_tokens: int = 128, max_tokens: int = 512, seed: int = 0,
                 heads: bool = False):
    """``train(step, ffn_masks, head_masks)`` for :func:`adapt_prune`: ``steps`` trainer steps
    on ``data`` (stage-1 text) with the LLM trained under the step's masks."""
    from ..train import trainer

    if steps < 0:
        raise IFPError(f"training steps per pruning step must be >= 0, got {steps}")
    fixed = FixedMasks()
    loss = trainer.MaskedLMLoss(fixed, _Unpack(masked.module()))
    # the masked module holds the model's own Parameter objects: training it trains the model
    shared = {id(p) for p in model.parameters()}
    if not all(id(p) in shared for p in loss.parameters()):
        raise IFPError("internal: the masked program does not share the model's parameters")

    def train(step: int, ffn_masks, head_masks) -> None:
        if steps == 0:
            return
        fixed.masks = (list(ffn_masks), list(head_masks)) if heads else (list(ffn_masks),)
        scratch = tempfile.mkdtemp(prefix="ifp-adapt-train-")
        try:
            cfg = TrainConfig(data=str(data), out=scratch, train_llm=True, steps=steps, llm_lr=lr, lr=lr,
                              batch_size=batch_size, chunk_tokens=chunk_tokens, max_tokens=max_tokens,
                              seed=seed + step, save_every=0, resume=False)
            setup = trainer.Setup(cfg, model, tokenizer, program, masked, fixed, loss, [])
            if not quiet():
                import sys

                print(f"[ifp] training {steps} steps under the step-{step} masks", file=sys.stderr)
            trainer.run(cfg, setup_=setup)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        model.eval()

    return train


__all__ = ["FixedMasks", "calibration_chunks", "trainer_hook"]
