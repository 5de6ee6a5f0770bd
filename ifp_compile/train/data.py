"""Training data: JSONL readers and the two stages' examples.

An :class:`Example` is what one forward needs: the ids the predictor reads, the ids the
LLM reads, and which of the LLM's next-token targets count in the loss.

Stage 1 (continued pre-training): a text is cut into chunks of ``chunk_tokens``; for
each consecutive pair, the predictor reads chunk ``j`` and the LLM reads chunks ``j``
and ``j + 1`` with the loss on chunk ``j + 1`` only. (The paper says the mask from
chunk ``j`` is used to predict chunk ``j + 1``; giving the LLM chunk ``j`` as context
is our choice, so the first tokens of ``j + 1`` are not predicted from nothing.)

Stage 2 (instruction tuning): the predictor reads the first user message; the LLM
reads the whole conversation (the tokenizer's chat template when it has one, else
``role: content`` lines) with the loss on the assistant's tokens only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import TrainError


@dataclass(frozen=True)
class Example:
    predictor_ids: tuple[int, ...]
    input_ids: tuple[int, ...]
    #: loss_mask[i] says whether input_ids[i] is a target (predicted from input_ids[:i])
    loss_mask: tuple[bool, ...]

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss_mask)


class ByteTokenizer:
    """UTF-8 bytes modulo ``vocab_size``: a tokenizer for tiny random test models."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids the same way ``specialize(program, text, tokenizer=...)`` makes them."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer(text)["input_ids"])


def read_jsonl(path) -> list[tuple[int, dict]]:
    """``(line number, record)`` for every non-blank line; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"data file {path} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise TrainError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TrainError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            out.append((lineno, record))
    if not out:
        raise TrainError(f"data file {path} is empty")
    return out


def _text(record: dict, where: str) -> str:
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise TrainError(f"{where}: stage 1 needs a non-empty \"text\" string")
    return text


def _messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise TrainError(f"{where}: \"messages\" must be a non-empty list")
        for i, m in enumerate(msgs):
            if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                    or not isinstance(m.get("content"), str)):
                raise TrainError(f"{where}: message {i} must be {{\"role\": system|user|assistant, "
                                 "\"content\": string}")
    elif "instruction" in record and "response" in record:
        if not all(isinstance(record[k], str) and record[k].strip() for k in ("instruction", "response")):
            raise TrainError(f"{where}: \"instruction\" and \"response\" must be non-empty strings")
        msgs = [{"role": "user", "content": record["instruction"]},
                {"role": "assistant", "content": record["response"]}]
    else:
        raise TrainError(f"{where}: stage 2 needs \"messages\" or \"instruction\" and \"response\"")
    if not any(m["role"] == "user" for m in msgs):
        raise TrainError(f"{where}: the conversation has no user message to predict the mask from")
    if not any(m["role"] == "assistant" for m in msgs):
        raise TrainError(f"{where}: the conversation has no assistant message to train on")
    return msgs


def stage1_examples(text_ids: list[int], chunk: int, max_tokens: int) -> list[Example]:
    ids = text_ids[:max_tokens]
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    out = []
    for a, b in zip(chunks, chunks[1:]):
        if len(b) < 1:
            continue
        out.append(Example(tuple(a), tuple(a + b), tuple([False] * len(a) + [True] * len(b))))
    return out


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if not isinstance(ids, (list, tuple)):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    if add_generation_prompt:
        text += "assistant: "
    return encode(tokenizer, text)


def stage2_example(tokenizer, messages: list[dict], max_tokens: int) -> Example | None:
    """Loss on the assistant turns: the tokens each adds after the prompt before it."""
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(ids)] != ids:
            raise TrainError("the chat template renders a conversation prefix differently from the whole "
                             "conversation, so the assistant tokens cannot be located")
        if m["role"] == "assistant":
            prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
            if full[: len(prompt)] != prompt:  # no separable generation prompt: all new tokens count
                prompt = ids
            new = full[len(ids):]
            n_prompt = max(0, len(prompt) - len(ids))
            mask += [False] * n_prompt + [True] * (len(new) - n_prompt)
        else:
            new = full[len(ids):]
            mask += [False] * len(new)
        ids = full
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not any(mask[1:]):
        return None
    return Example(tuple(encode(tokenizer, first_user)), tuple(ids), tuple(mask))


def load_examples(path, stage: int, tokenizer, chunk_tokens: int, max_tokens: int) -> list[Example]:
    """Every example of a JSONL file (order = file order); an empty result is an error."""
    out: list[Example] = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if stage == 1:
            out += stage1_examples(encode(tokenizer, _text(record, where)), chunk_tokens, max_tokens)
        else:
            ex = stage2_example(tokenizer, _messages(record, where), max_tokens)
            if ex is not None:
                out.append(ex)
    if not out:
        what = (f"no text is longer than one chunk ({chunk_tokens} tokens)" if stage == 1
                else f"no conversation keeps an assistant token within max_tokens={max_tokens}")
        raise TrainError(f"data file {path} gives no training examples: {what}")
    return out
