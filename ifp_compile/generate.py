"""Greedy decoding with an exported program (no KV cache).

The programs ``ifp.export`` produces are logits-only (``input_ids -> logits``), so decoding
re-runs the whole prefix each step. That is quadratic, but for the short answers of the
demo it costs a second or two, and it runs the *exact* program that would be shipped.
For decoding at speed, ``decode_step`` exports a step with the KV cache inside.
"""

from __future__ import annotations

import torch

from .errors import InstructionError


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids ``[1, T]`` of ``prompt`` as a user turn, with the generation prompt appended."""
    if not prompt.strip():
        raise InstructionError("prompt is empty")
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        # transformers 5 returns a BatchEncoding (a dict) here; 4.x returned the tensor
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return torch.as_tensor(ids).reshape(1, -1).long()


@torch.no_grad()
def greedy_generate(module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                    extra: tuple = ()) -> torch.Tensor:
    """The ``max_new_tokens`` (or fewer, stopping at EOS) greedy continuation ids of ``input_ids``
    (``extra`` follow the ids in every call: the masks of a masked program)."""
    ids = input_ids
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = module(ids, *extra)
        nxt = int(logits[0, -1].argmax())
        if eos_token_id is not None and nxt == eos_token_id:
            break
        new.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], dim=1)
    return torch.tensor(new, dtype=torch.long)
