"""ifp_compile.corpora: determinism, leak-free splits, correct math, errors.

Prose parses the standard library once per process, so its checks use small ``n``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys

import pytest

from ifp_compile import corpora as dc

SMALL = {"code": 60, "prose": 25, "math": 30}


@pytest.mark.parametrize("domain", dc.TEXT_DOMAINS)
def test_deterministic_and_prefix_stable(domain):
    n = SMALL[domain]
    first = dc.texts(domain, "train", n)
    assert first == dc.texts(domain, "train", n)
    assert dc.texts(domain, "train", n // 2) == first[: n // 2]  # asking for fewer never changes the first ones
    assert dc.texts(domain, "train", n, seed=1) != first  # the seed reorders


def test_identical_in_a_fresh_process_with_another_hash_seed():
    """In-process repeats hit the memo; a new interpreter with a different str-hash salt
    catches any dependence on ``hash()`` or set order."""
    script = (
        "import hashlib\n"
        "from ifp_compile import corpora as dc\n"
        f"for domain, n in {SMALL!r}.items():\n"
        "    for split in dc.SPLITS:\n"
        "        print(hashlib.sha256('\\0'.join(dc.texts(domain, split, n)).encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    here = [
        hashlib.sha256("\0".join(dc.texts(domain, split, n)).encode()).hexdigest()
        for domain, n in SMALL.items()
        for split in dc.SPLITS
    ]
    assert out.split() == here


@pytest.mark.parametrize("domain", dc.TEXT_DOMAINS)
@pytest.mark.parametrize("min_chars", [400, 1200])
def test_min_chars(domain, min_chars):
    for split in dc.SPLITS:
        got = dc.texts(domain, split, SMALL[domain], min_chars=min_chars)
        assert len(got) == SMALL[domain]
        assert all(len(t) >= min_chars for t in got)


def test_code_texts_are_line_aligned_windows_of_their_split():
    files = {split: [dc._read(dc._domain_sources("code")[k]) for k in dc.sources("code", split)] for split in dc.SPLITS}
    for split, other in (("heldout", "train"), ("train", "heldout")):
        for text in dc.texts("code", split, 25):
            owners = [src for src in files[split] if text in src]
            assert owners, "a code text must be a window of a file of its own split"
            start = owners[0].index(text)
            assert start == 0 or owners[0][start - 1] == "\n"  # starts at a line boundary
            assert not any(text in src for src in files[other])


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_sources_split_by_file(domain):
    train, heldout = dc.sources(domain, "train"), dc.sources(domain, "heldout")
    assert train and heldout and not set(train) & set(heldout)
    assert set(train) | set(heldout) == set(dc._domain_sources(domain))
    assert 0.25 < len(heldout) / (len(train) + len(heldout)) < 0.42  # ~33% held out
    assert all(k.startswith("stdlib/") for k in train + heldout)  # never the installed packages
    assert all(dc._split_of(k) == "train" for k in train)
    assert all(dc._split_of(k) == "heldout" for k in heldout)


def test_split_of_is_pinned():
    """A changed hash scheme would silently reshuffle every corpus (and leak old held-out files)."""
    pinned = {"stdlib/os.py": "heldout", "stdlib/json/decoder.py": "heldout", "stdlib/random.py": "heldout",
              "stdlib/argparse.py": "train", "stdlib/typing.py": "train", "stdlib/ast.py": "train"}
    assert {path: dc._split_of(path) for path in pinned} == pinned


def test_code_splits_share_no_text():
    train, heldout = dc.texts("code", "train", 2000), dc.texts("code", "heldout", 300)
    assert not set(train) & set(heldout)


def test_prose_splits_share_no_docstring():
    train_docs = [d for _, d in zip(range(400), dc._prose_stream("train", 0))]
    heldout_docs = [d for _, d in zip(range(150), dc._prose_stream("heldout", 0))]
    shared = dc._shared_contents()
    assert not any(dc._content_key(d) in shared for d in train_docs + heldout_docs)
    assert not {dc._content_key(d) for d in train_docs} & {dc._content_key(d) for d in heldout_docs}
    train, heldout = dc.texts("prose", "train", 60), dc.texts("prose", "heldout", 30)
    assert not set(train) & set(heldout)
    assert not any(h in t or t in h for h in heldout for t in train)


def test_prose_is_not_code():
    for text in dc.texts("prose", "train", 25) + dc.texts("prose", "heldout", 10):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        assert not any(line.startswith(">>>") for line in lines)
        assert "\t" not in text and "  " not in text  # whitespace-normalised
        assert dc._is_english(text)


def test_prose_filter_drops_doctest_heavy_docstrings():
    prose = "This function computes the thing that you asked for, and it is the best way to do it. " * 4
    assert dc._prose(prose) is not None
    doctest = prose + "\n\nExamples:\n\n" + "\n".join([">>> f(1)", "2", ">>> f(2)", "3", ">>> f(3)"] * 3)
    assert dc._prose(doctest) is None
    assert dc._prose("short docstring") is None


# ------------------------------------------------------------------------------ math

_EQUATION = re.compile(r"((?:\$?\d+ [-+×÷] )+\$?\d+) = \$?(\d+)")


def _check_arithmetic(text: str) -> int:
    """Every ``a op b ... = c`` in the text is right; returns how many were checked."""
    found = _EQUATION.findall(text)
    for expr, result in found:
        value = eval(expr.replace("$", "").replace("×", "*").replace("÷", "/"), {})  # digits and + - * / only
        assert value == int(result), f"{expr} = {result}"
    return len(found)


def _split_of_template(template: str) -> str:
    return next(s for s in dc.SPLITS if template in dc.SPLIT_TEMPLATES[s])


@pytest.mark.parametrize("template", dc.TEMPLATES)
def test_math_problems_are_correct(template):
    rng, split = random.Random(7), _split_of_template(template)
    for _ in range(60):
        text, answer = dc.problem(rng, template, split)
        question, solution, last = text.split("\n")
        assert question.startswith("Question: ") and solution.startswith("Solution: ")
        assert last == f"Answer: {answer}" and answer >= 0
        assert _check_arithmetic(solution) >= 1
        assert str(answer) in solution


def test_math_shopping_answer_from_the_question():
    rng = random.Random(3)
    for _ in range(100):
        text, answer = dc.problem(rng, "shopping")
        question = text.split("\n")[0]
        total = sum(int(q) * int(p) for q, p in re.findall(r"(\d+) [a-z ]+? at \$(\d+) each", question))
        budget = re.search(r"has \$(\d+)\.", question)
        assert answer == (int(budget.group(1)) - total if budget else total)


def test_math_percent_answer_from_the_question():
    rng = random.Random(4)
    for _ in range(100):
        text, answer = dc.problem(rng, "percent", "heldout")
        question = text.split("\n")[0]
        base, percent = (int(x) for x in re.search(r"(\d+)\D+?(\d+)%", question).groups())
        assert base * percent % 100 == 0  # whole-number answers by construction
        assert answer == base - base * percent // 100  # price after the discount / students not playing


def test_math_texts_concatenate_whole_problems():
    for text in dc.texts("math", "train", 20):
        assert text.count("Question: ") == text.count("Answer: ") >= 2
        assert text.rstrip().splitlines()[-1].startswith("Answer: ")
        assert _check_arithmetic(text) >= 2


def test_math_heldout_templates_are_never_trained_on():
    assert sorted(dc.SPLIT_TEMPLATES["train"] + dc.SPLIT_TEMPLATES["heldout"]) == sorted(dc.TEMPLATES)
    assert not set(dc.SPLIT_TEMPLATES["train"]) & set(dc.SPLIT_TEMPLATES["heldout"])
    kinds = {"speed": "per hour", "percent": "%", "shopping": " each", "sharing": "shares them equally",
             "multistep": "packs with"}
    for split in dc.SPLITS:
        problems = [p for t in dc.texts("math", split, 40) for p in t.split("\n\n")]
        seen = {k for k, marker in kinds.items() if any(marker in p for p in problems)}
        assert seen == set(dc.SPLIT_TEMPLATES[split]), split
    with pytest.raises(ValueError, match="math template 'speed' belongs to the other split, not 'train'"):
        dc.problem(random.Random(0), "speed", "train")


def test_math_heldout_is_distinct_from_train():
    assert not set(dc.NAMES["train"]) & set(dc.NAMES["heldout"])
    train, heldout = dc.texts("math", "train", 100), dc.texts("math", "heldout", 100)
    train_problems = {p for t in train for p in t.split("\n\n")}
    heldout_problems = {p for t in heldout for p in t.split("\n\n")}
    assert not train_problems & heldout_problems
    for split, texts, other in (("train", train, "heldout"), ("heldout", heldout, "train")):
        for problem in {p for t in texts for p in t.split("\n\n")}:
            assert any(re.search(rf"\b{n}\b", problem) for n in dc.NAMES[split])
            assert not any(re.search(rf"\b{n}\b", problem) for n in dc.NAMES[other])


# ---------------------------------------------------------------------------- errors


def test_errors_name_the_domain_and_split():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        dc.texts("poetry", "train", 1)
    with pytest.raises(ValueError, match="unknown split 'test' for domain 'code'"):
        dc.texts("code", "test", 1)
    with pytest.raises(ValueError, match=r"only \d+ code/heldout texts of >= 1200 chars are available, 1000000"):
        dc.texts("code", "heldout", 1_000_000)
    with pytest.raises(ValueError, match="math"):
        dc.sources("math", "train")
    with pytest.raises(ValueError, match="code/train"):
        dc.texts("code", "train", -1)
    with pytest.raises(ValueError, match="unknown math template"):
        dc.problem(random.Random(0), "calculus")


# -------------------------------------------------------------------------- docstring


def test_docstring_pairs_are_functions_of_their_split_without_their_docstring():
    import ast

    sources = {split: [dc._read(dc._domain_sources("prose")[k]) for k in dc.sources("docstring", split)]
               for split in dc.SPLITS}
    flat = {split: [" ".join(src.split()) for src in sources[split]] for split in dc.SPLITS}
    heldout = dc.pairs("docstring", "heldout", 40)
    assert heldout == dc.pairs("docstring", "heldout", 40) and dc.pairs("docstring", "heldout", 10) == heldout[:10]
    train = dc.pairs("docstring", "train", 40)
    assert not {c for _, c in train} & {c for _, c in heldout}
    for split, found, other in (("heldout", heldout, "train"), ("train", train, "heldout")):
        for prompt, completion in found:
            assert prompt.startswith(dc.INSTRUCTIONS["docstring"] + "\n\n```python\n") and prompt.endswith("Docstring:\n")
            code = prompt.split("```python\n")[1].split("\n```")[0]
            fn = ast.parse(code).body[0]
            assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn) is None
            assert completion not in code and dc.MIN_FUNCTION_DOC_CHARS <= len(completion)
            name = f"def {fn.name}("
            assert any(name in src and completion.splitlines()[0] in src for src in sources[split])
            # neither the function nor its docstring occurs in a file of the other split
            assert not any(" ".join(code.split()) in src or " ".join(completion.split()) in src for src in flat[other])


def test_every_domain_has_an_instruction_and_docstring_has_no_texts():
    assert set(dc.INSTRUCTIONS) == set(dc.DOMAINS) == set(dc.TEXT_DOMAINS) | {"docstring"}
    with pytest.raises(ValueError, match="use pairs"):
        dc.texts("docstring", "train", 1)
    with pytest.raises(ValueError, match="use texts"):
        dc.pairs("code", "train", 1)
    with pytest.raises(ValueError, match=r"only \d+ docstring/heldout pairs are available, 100000 requested"):
        dc.pairs("docstring", "heldout", 100_000)
    assert dc.available("docstring", "heldout") >= 150  # enough for 100 held-out segments


def test_available_matches_texts_for_code():
    count = dc.available("code", "heldout")
    assert len(dc.texts("code", "heldout", count)) == count
    assert dc.available("math", "train") is None


def test_write_jsonl(tmp_path):
    path = tmp_path / "math-train.jsonl"
    records = dc.texts("math", "train", 3)
    assert dc.write_jsonl(path, records) == 3
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"text": t} for t in records]
    assert "×" in lines[0]  # utf-8, not \u escapes
