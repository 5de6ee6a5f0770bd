"""The four evaluation domains, built from material on every machine (``ifp_compile.corpora``).

* loss examples, text domains (code, prose, math): a held-out text's first ``prompt``
  tokens are what a per-input mask is chosen from; the loss is over tokens
  ``prompt .. total`` only, so a mask never scores the tokens it was chosen from;
* loss examples, docstring (instruction-driven): the prompt is the instruction and a
  held-out function without its docstring, the loss is over the docstring's tokens;
* math problems: a held-out word problem as a chat turn; the model answers with the chat
  template, and the answer is right when the last integer of the generated text equals
  the problem's exact answer (an instruct model of this size often says "The answer is
  42." rather than "42", so the last number is what counts, not the first token).
"""

from __future__ import annotations

import random
import re

import torch

from .. import corpora
from ..errors import IFPError
from ..train.data import Example, encode

PROMPT_TOKENS, TOTAL_TOKENS = 64, 256
MATH_INSTRUCTION = "Solve the problem. End your reply with the final answer as a number."


MIN_COMPLETION_TOKENS = 16


def instruction_ids(tokenizer, domain: str) -> torch.Tensor:
    """``[1, T]`` ids of the domain's task instruction: what a per-task predictor reads."""
    return torch.tensor([encode(tokenizer, corpora.INSTRUCTIONS[domain])])


def constant_ids(tokenizer) -> torch.Tensor:
    """``[1, T]`` ids of the one input a static learned mask's predictor reads."""
    from ..train.data import CONSTANT_INPUT

    return torch.tensor([encode(tokenizer, CONSTANT_INPUT)])


def _docstring_examples(tokenizer, n: int, total: int) -> list[Example]:
    out: list[Example] = []
    available = corpora.available("docstring", "heldout")
    for prompt_text, completion in corpora.pairs("docstring", "heldout", available):
        prompt = encode(tokenizer, prompt_text)
        ids = (prompt + encode(tokenizer, completion))[:total]
        if len(ids) - len(prompt) >= MIN_COMPLETION_TOKENS:
            out.append(Example(tuple(prompt), tuple(ids), (False,) * len(prompt) + (True,) * (len(ids) - len(prompt))))
        if len(out) == n:
            return out
    raise IFPError(f"only {len(out)} held-out docstring pairs fit in {total} tokens with this tokenizer, {n} needed; "
                   "ask for fewer segments")


def loss_examples(tokenizer, domain: str, n: int, *, prompt: int = PROMPT_TOKENS,
                  total: int = TOTAL_TOKENS) -> list[Example]:
    """``n`` held-out segments of ``domain``: the mask reads tokens ``0..prompt``, the loss
    is over ``prompt..total`` (docstring: the prompt is the instruction and the function,
    the loss is over the docstring, at most ``total`` tokens in all)."""
    if domain == "docstring":
        return _docstring_examples(tokenizer, n, total)
    out: list[Example] = []
    count = corpora.available(domain, "heldout", min_chars=1200)
    for text in corpora.texts(domain, "heldout", 4 * n if count is None else min(4 * n, count), min_chars=1200):
        ids = encode(tokenizer, text)
        if len(ids) >= total:
            ids = ids[:total]
            out.append(Example(tuple(ids[:prompt]), tuple(ids), (False,) * prompt + (True,) * (total - prompt)))
        if len(out) == n:
            return out
    raise IFPError(f"only {len(out)} held-out {domain} texts have {total} tokens with this tokenizer, {n} needed; "
                   "ask for fewer segments")


def math_problems(n: int, *, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` held-out word problems as ``(question, answer)``, of the held-out templates."""
    rng = random.Random(f"ifp-eval-math|{seed}")
    out = []
    for _ in range(n):
        text, answer = corpora.problem(rng, rng.choice(corpora.SPLIT_TEMPLATES["heldout"]), "heldout")
        question = text.split("\nSolution:")[0].removeprefix("Question: ")
        out.append((question, int(answer)))
    return out


def math_prompt(question: str) -> str:
    return f"{question}\n{MATH_INSTRUCTION}"


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: int) -> bool:
    got = final_number(text)
    return got is not None and got == float(answer)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Chat-templated ids ``[1, T]`` (plain encoding for test tokenizers without a template)."""
    from ..generate import chat_ids
    from ..train.data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return torch.tensor([tokenizer.encode(prompt)])
    return chat_ids(tokenizer, prompt)
