"""Training data: JSONL readers and the two stages' examples.

An :class:`Example` is what one forward needs: the ids the predictor reads, the ids the
LLM reads, and which of the LLM's next-token targets count in the loss.

Stage 1 (continued pre-training): a text is cut into chunks of ``chunk_tokens``; for
each consecutive pair, the predictor reads chunk ``j`` and the LLM reads chunks ``j``
and ``j + 1`` with the loss on chunk ``j + 1`` only. (The paper says the mask from
chunk ``j`` is used to predict chunk ``j + 1``; giving the LLM chunk ``j`` as context
is our choice, so the first tokens of ``j + 1`` are not predicted from nothing.)

A stage 1 record may instead be a ``prompt``/``completion`` pair (an instruction-driven
task such as ``corpora``'s docstring domain): the LLM reads both with the loss on the
completion, and the predictor reads the prompt.

What the predictor reads can be replaced for a whole run (``predictor.input``): the
record's ``instruction`` (per-task masks) or one constant input (a static mask learned
with the same data and budget as the per-input and per-task ones).

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


class ByteTokenizer:
    """UTF-8 bytes modulo ``vocab_size``: a tokenizer for tiny random test models."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Bytes back to text (lossy when ``vocab_size < 256``; test models only)."""
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


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
        raise TrainError(f"{where}: stage 1 needs a non-empty \"text\" string (or \"prompt\" and \"completion\")")
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
    first = next((m for m in msgs if m["role"] != "system"), None)
    if first is None or first["role"] != "user":
        raise TrainError(f"{where}: the conversation must start with a user message (after any system message): "
                         "the mask is predicted from it")
    if not first["content"].strip():
        raise TrainError(f"{where}: the first user message is empty: there is nothing to predict the mask from")
    if not any(m["role"] == "assistant" for m in msgs):
        raise TrainError(f"{where}: the conversation has no assistant message to train on")
    return msgs


#: what a "constant"-input predictor reads for every example: any fixed text would do
CONSTANT_INPUT = "Any task."


def pair_example(prompt_ids: list[int], completion_ids: list[int], max_tokens: int) -> Example | None:
    """The LLM reads prompt + completion (cut at ``max_tokens``), the loss is on the completion."""
    ids = (prompt_ids + completion_ids)[:max_tokens]
    if len(prompt_ids) < 1 or len(ids) <= len(prompt_ids):
        return None
    mask = [False] * len(prompt_ids) + [True] * (len(ids) - len(prompt_ids))
    return Example(tuple(prompt_ids), tuple(ids), tuple(mask))


def stage1_examples(text_ids: list[int], chunk: int, max_tokens: int) -> list[Example]:
    ids = text_ids[:max_tokens]
    chunks = [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    out = []
    for a, b in zip(chunks, chunks[1:]):
        out.append(Example(tuple(a), tuple(a + b), tuple([False] * len(a) + [True] * len(b))))
    return out


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool, where: str) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja errors, "roles must alternate", empty conversations...
        raise TrainError(f"{where}: the tokenizer's chat template rejects this conversation: {e}") from None
    if not isinstance(ids, (list, tuple)):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _templated(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """Render turn by turn; a turn's new tokens after its generation prompt are targets."""
    ids: list[int] = []
    mask: list[bool] = []
    for i, m in enumerate(messages):
        full = _template_ids(tokenizer, messages[: i + 1], False, where)
        if full[: len(ids)] != ids:
            raise TrainError(f"{where}: the chat template renders the first {i} messages differently inside the "
                             "whole conversation, so the assistant tokens cannot be located")
        n_prompt = len(ids)
        if m["role"] == "assistant":  # the header the model sees before it answers is not a target
            n_prompt = max(n_prompt, _common_prefix(_template_ids(tokenizer, messages[:i], True, where), full))
        mask += [False] * (n_prompt - len(ids)) + [m["role"] == "assistant"] * (len(full) - n_prompt)
        ids = full
    return ids, mask


def _plain(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """``role: content`` lines, each piece tokenized on its own so the label never merges
    into the reply's first token (and so is never a target)."""
    ids: list[int] = []
    mask: list[bool] = []
    for m in messages:
        label, body = encode(tokenizer, f"{m['role']}:"), encode(tokenizer, f" {m['content']}\n")
        ids += label + body
        mask += [False] * len(label) + [m["role"] == "assistant"] * len(body)
    return ids, mask


def stage2_example(tokenizer, messages: list[dict], max_tokens: int, where: str = "conversation") -> Example | None:
    """Loss on the assistant turns only; the predictor reads the first user message."""
    first_user = next(m["content"] for m in messages if m["role"] == "user")
    if getattr(tokenizer, "chat_template", None):
        ids, mask = _templated(tokenizer, messages, where)
    else:
        ids, mask = _plain(tokenizer, messages)
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    if not any(mask[1:]):
        return None
    return Example(tuple(encode(tokenizer, first_user)), tuple(ids), tuple(mask))


def _pair(record: dict, where: str) -> tuple[str, str]:
    if not all(isinstance(record.get(k), str) and record[k].strip() for k in ("prompt", "completion")):
        raise TrainError(f"{where}: \"prompt\" and \"completion\" must be non-empty strings")
    return record["prompt"], record["completion"]


def _predictor_input(record: dict, how: str, tokenizer, where: str) -> tuple[int, ...] | None:
    """The ids the predictor reads instead of the example's own text (None: its own)."""
    if how == "constant":
        return tuple(encode(tokenizer, CONSTANT_INPUT))
    if how == "instruction":
        text = record.get("instruction")
        if not isinstance(text, str) or not text.strip():
            raise TrainError(f"{where}: predictor.input is \"instruction\" but the record has no non-empty "
                             "\"instruction\" string")
        return tuple(encode(tokenizer, text))
    return None


def load_examples(path, stage: int, tokenizer, chunk_tokens: int, max_tokens: int,
                  predictor_input: str = "text") -> list[Example]:
    """Every example of a JSONL file (order = file order); an empty result is an error.

    ``predictor_input``: "text" (the predictor reads each example's own input), "instruction"
    (the record's ``instruction``) or "constant" (:data:`CONSTANT_INPUT`)."""
    out: list[Example] = []
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        if stage == 1 and "text" not in record and "prompt" in record:
            prompt, completion = _pair(record, where)
            found = [pair_example(encode(tokenizer, prompt), encode(tokenizer, completion), max_tokens)]
        elif stage == 1:
            found = stage1_examples(encode(tokenizer, _text(record, where)), chunk_tokens, max_tokens)
        else:
            found = [stage2_example(tokenizer, _messages(record, where), max_tokens, where)]
        reads = _predictor_input(record, predictor_input, tokenizer, where)
        out += [ex if reads is None else Example(reads, ex.input_ids, ex.loss_mask) for ex in found if ex is not None]
    if not out:
        what = (f"no text is longer than one chunk ({chunk_tokens} tokens)" if stage == 1
                else f"no conversation keeps an assistant token within max_tokens={max_tokens}")
        raise TrainError(f"data file {path} gives no training examples: {what}")
    return out
