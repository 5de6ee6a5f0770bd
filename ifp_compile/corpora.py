"""Offline corpora in four domains -- code, prose, math, docstring -- for training and
evaluating a mask predictor (e.g. for SmolLM2-135M-Instruct) on CPU.

    python -m ifp_compile.corpora [--out DIR] [--n N] [--min-chars C] [--seed S]

Every text comes from the Python standard library or from a seeded generator, so nothing
is downloaded, and the corpora are the same on every machine with the same Python version,
whatever packages happen to be installed:

* ``code``  -- windows of the standard library's own source files;
* ``prose`` -- long English docstrings of the standard library;
* ``math``  -- arithmetic word problems with worked answers, generated from a seed;
* ``docstring`` -- an *instruction-driven* task: "Write a docstring for this Python
  function." followed by a standard-library function with its docstring removed; the
  completion is the docstring (:func:`pairs`). Its input is code and its output English,
  so the text read so far does not say what comes next: the instruction does.

The first three are *text-driven* (the continuation looks like the text before it). Each
domain also has one task instruction (:data:`INSTRUCTIONS`), what a per-task mask
predictor reads.

Held-out text must be *unseen*, not merely *other windows of seen files*: neighbouring
windows of one file share identifiers, style and topic, so a predictor evaluated on
them would look better than it is. That is why code and prose are split **by source
file** (a sha256 of the file's relative path, :func:`_split_of`), never by text. The
same key is used for every domain, so a held-out stdlib file contributes neither code,
prose nor docstrings to training. A third of the files is held out, so that the smallest
held-out set (prose) still has more than 100 segments of 256 tokens.

Files are not the only way text repeats, though: copy-pasted docstrings (the same text
in two modules, with only a name changed) would put the same prose on both sides of a
file split. A docstring whose lower-case words (:func:`_content_key`) occur in a file of
each split is therefore used by neither (:func:`_shared_contents`).

Math problems have no files to split. The held-out problems come from a disjoint seed
stream (the split is part of every generator's seed), use a disjoint set of person names
(:data:`NAMES`) **and** disjoint problem templates (:data:`SPLIT_TEMPLATES`): a held-out
problem is a kind of problem never seen in training, so the held-out loss measures
arithmetic in new wording, not fitting a format.

Everything is a pure function of (installed files, arguments): file lists are sorted,
orders come from sha256 (never the salted built-in ``hash``), and no set is iterated.
Only the per-file docstring extraction is memoised (keyed on path, size and mtime),
which makes repeated calls in one process cheap without changing their results.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

DOMAINS = ("code", "prose", "math", "docstring")
#: the domains whose examples are plain texts (continued by the model); docstring has pairs
TEXT_DOMAINS = ("code", "prose", "math")
SPLITS = ("train", "heldout")

HELDOUT_PERCENT = 33  # share of source files that is held out

#: what a per-task predictor reads for each domain (the task, not its text)
INSTRUCTIONS = {
    "code": "Continue this Python source file from the standard library.",
    "prose": "Continue this technical documentation, written in plain English prose.",
    "math": "Solve these arithmetic word problems step by step, ending with the answer.",
    "docstring": "Write a docstring for this Python function.",
}
MIN_CODE_FILE_BYTES = 2048  # smaller files are mostly boilerplate (imports, __all__)
MIN_DOCSTRING_CHARS = 300  # shorter docstrings are one-liners, not prose
MAX_CODE_LINE_FRACTION = 0.2  # docstrings with more code-like lines than this are dropped

# Directories never read. Tests are dominated by assertions and fixtures; idlelib and
# lib2to3 are applications rather than library code; encodings/ holds ~80 generated
# charmap tables that would crowd out real code; pydoc_data is one giant string literal;
# vendored copies duplicate other packages.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "encodings", "pydoc_data", "__pycache__"}
)


# --------------------------------------------------------------------------- hashing


def _digest(text: str) -> int:
    """A stable 64-bit hash of ``text`` (sha256), unlike the per-process salted ``hash``."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _split_of(relpath: str) -> str:
    """The split of a source file, from a sha256 of its relative path alone.

    The path (not the seed, not the content) decides, so the split is the same for every
    seed and every ``min_chars``, and a file never moves between splits when it is edited.
    """
    return "heldout" if _digest(relpath) % 100 < HELDOUT_PERCENT else "train"


def _content_key(doc: str) -> str:
    """The lower-case words of ``doc``: equal for docstrings that differ only in names.

    Capitalised words, identifiers and numbers are dropped, so copy-pasted docstrings
    that differ only in a class name (``BertModel`` vs ``RobertaModel``) share one key.
    """
    return " ".join(re.findall(r"(?<![\w`.])[a-z]+(?![\w`.])", doc))




def _seeded_order(keys: Iterable[str], seed: int, salt: str = "") -> list[str]:
    """``keys`` in a pseudo-random but reproducible order determined by ``seed``."""
    return sorted(keys, key=lambda k: (_digest(f"{seed}|{salt}|{k}"), k))


# ----------------------------------------------------------------------- source files


def _python_files(root: Path, skip_dirs: frozenset[str], min_bytes: int) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of the ``.py`` files under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if name.endswith(".py") and path.is_file() and path.stat().st_size >= min_bytes:
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(min_bytes: int) -> dict[str, Path]:
    return {f"stdlib/{rel}": path for rel, path in _python_files(_stdlib_root(), _STDLIB_SKIP_DIRS, min_bytes)}


def _domain_sources(domain: str) -> dict[str, Path]:
    if domain == "code":
        return _stdlib_sources(MIN_CODE_FILE_BYTES)
    return _stdlib_sources(1)


def _split_sources(domain: str, split: str) -> dict[str, Path]:
    return {key: path for key, path in _domain_sources(domain).items() if _split_of(key) == split}


def sources(domain: str, split: str) -> list[str]:
    """The sorted relative paths (``stdlib/...``) of the files
    that may contribute text to ``domain``/``split``. The two splits never share a file."""
    _check(domain, split)
    if domain == "math":
        raise ValueError("domain 'math' is generated, it has no source files")
    if domain == "docstring":
        domain = "prose"  # every stdlib file, like prose
    return sorted(_split_sources(domain, split))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


# ------------------------------------------------------------------------------- code


def _windows(source: str, min_chars: int) -> list[str]:
    """Consecutive, non-overlapping windows of whole lines, each >= ``min_chars`` long.

    A window starts at a line boundary and ends at the first line boundary past
    ``min_chars``, so texts are as short as allowed; a short tail is dropped.
    """
    windows, current, size = [], [], 0
    for line in source.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= min_chars:
            windows.append("".join(current))
            current, size = [], 0
    return windows


def _code_texts(split: str, seed: int, min_chars: int) -> list[str]:
    """All code windows of the split, interleaved across files.

    Round ``r`` takes the ``r``-th window of every file (each file's windows in a seeded
    order), so the first texts come from as many different files -- and from anywhere in
    them, not only their import headers -- as possible.
    """
    per_file: list[list[str]] = []
    paths = _split_sources("code", split)
    for key in _seeded_order(paths, seed, "code-files"):
        source = _read(paths[key])
        windows = _windows(source, min_chars) if source else []
        order = _seeded_order((str(i) for i in range(len(windows))), seed, f"code-windows|{key}")
        per_file.append([windows[int(i)] for i in order])
    rounds = max((len(w) for w in per_file), default=0)
    return [w[r] for r in range(rounds) for w in per_file if r < len(w)]


# ------------------------------------------------------------------------------ prose

_PROMPT = re.compile(r"^(>>>|\.\.\.(\s|$)|\$ |In \[\d+\]:|Out\[\d+\]:)")
_STATEMENT = re.compile(
    r"^(@[\w.]+|(async )?def \w+\(|class \w+[(:]|import \w|from [\w.]+ import |return\b|yield\b|raise \w|assert \w"
    r"|(if|elif|for|while|with|except|try|else|finally)\b[^.]*:$|print\(|lambda\b|#|[\w.\[\]'\"]+ ?[-+*/|]?= ?\S)"
)
_CODE_CHARS = frozenset("()[]{}=<>;|&\\_")
_UNDERLINE = re.compile(r"^\s*([-=~^*#+`'\"])\1{2,}\s*$")
_STOPWORDS = frozenset(
    "a an and are as at be by can for from has if in is it its may not of on or that the this to was which will with"
    .split()
)


def _looks_like_code(line: str) -> bool:
    """Whether one (stripped, non-empty) docstring line looks like code, not English."""
    if _PROMPT.match(line) or _STATEMENT.match(line) or line.endswith(("{", "}", "):", "],")):
        return True
    visible = line.replace(" ", "")
    return sum(c in _CODE_CHARS for c in visible) > 0.12 * len(visible)


def _code_line_flags(lines: Sequence[str]) -> list[bool]:
    """Per line: code-like? Lines of ``::`` literal blocks and ``` fences always are."""
    flags, fence, literal_indent = [], False, None
    for line in lines:
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if stripped.startswith("```"):
            fence = not fence
            flags.append(True)
            continue
        if literal_indent is not None and stripped and indent <= literal_indent:
            literal_indent = None
        flags.append(bool(stripped) and (fence or literal_indent is not None or _looks_like_code(stripped)))
        if stripped.endswith("::"):
            literal_indent = indent
    return flags


def _normalise(lines: Iterable[str]) -> str:
    """Paragraphs joined by a blank line, each paragraph's whitespace collapsed."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(re.sub(r"\s+", " ", p) for p in paragraphs)


def _is_english(text: str) -> bool:
    """Mostly letters, with the common English function words prose always has."""
    words = re.findall(r"[A-Za-z]+", text)
    letters = sum(len(w) for w in words)
    visible = len(text) - text.count(" ") - text.count("\n")
    common = sum(w.lower() in _STOPWORDS for w in words)
    return letters >= 0.7 * visible and common >= 0.15 * max(len(words), 1)


def _prose(doc: str) -> str | None:
    """The docstring as normalised English prose, or None when it is short or code-heavy.

    Docstrings with more than ``MAX_CODE_LINE_FRACTION`` code-like lines (doctests,
    examples, signatures) are dropped whole; from the rest the few code-like lines and
    reST underlines are removed, so prose texts contain no code.
    """
    lines = doc.splitlines()
    flags = _code_line_flags(lines)
    nonblank = sum(bool(line.strip()) for line in lines)
    if not nonblank or sum(flags) > MAX_CODE_LINE_FRACTION * nonblank:
        return None
    kept = [line for line, code in zip(lines, flags) if not code and not _UNDERLINE.match(line)]
    text = _normalise(kept)
    return text if len(text) >= MIN_DOCSTRING_CHARS and _is_english(text) else None


def _docstring_nodes(body: Sequence[ast.stmt]) -> Iterator[ast.AST]:
    """Classes and functions in source order, also inside if/try/with blocks."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, field, ())
            yield from _docstring_nodes([n for n in children if isinstance(n, (ast.stmt, ast.excepthandler))])


def _docstrings(source: str) -> list[str]:
    """Module, class and function docstrings of a source file, in source order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = [ast.get_docstring(tree)]
    docs += [ast.get_docstring(node) for node in _docstring_nodes(tree.body)]
    return [d for d in docs if d and len(d) >= MIN_DOCSTRING_CHARS]


@functools.lru_cache(maxsize=32768)
def _file_prose(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """The prose docstrings of one file. Memoised: parsing is the expensive step, and
    ``size``/``mtime_ns`` in the key make a changed file miss the cache."""
    source = _read(Path(path))
    if not source or ('"""' not in source and "'''" not in source):
        return ()
    return tuple(p for p in map(_prose, _docstrings(source)) if p)


def _file_docs(key: str, path: Path) -> tuple[str, ...]:
    stat = path.stat()
    return _file_prose(str(path), stat.st_size, stat.st_mtime_ns)


def _shared_contents() -> frozenset[str]:
    """Content keys of docstrings found in a file of each split: used on neither side."""
    keys = {split: set() for split in SPLITS}
    for key, path in _domain_sources("prose").items():
        keys[_split_of(key)].update(_content_key(d) for d in _file_docs(key, path))
        keys[_split_of(key)].update(_content_key(d) for _, d in _file_functions(key, path))
    return frozenset(keys["train"] & keys["heldout"])


def _prose_stream(split: str, seed: int) -> Iterator[str]:
    """The split's prose docstrings, file by file in a seeded order, without repeats."""
    paths = _split_sources("prose", split)
    shared = _shared_contents()
    seen: set[str] = set()  # membership only, never iterated
    for key in _seeded_order(paths, seed, "prose-files"):
        for doc in _file_docs(key, paths[key]):
            content = _content_key(doc)
            if content not in shared and content not in seen:
                seen.add(content)
                yield doc


# -------------------------------------------------------------------------- docstring

MIN_FUNCTION_DOC_CHARS = 120  # shorter docstrings are one-liners: too little to score
MAX_FUNCTION_DOC_CHARS = 900
MIN_FUNCTION_CODE_CHARS, MAX_FUNCTION_CODE_CHARS = 120, 900  # the body, once the docstring is removed
MAX_FUNCTIONS_PER_FILE = 4  # so the first pairs come from many files, not a few big ones


def _without_docstring(source_lines: list[str], node: ast.AST) -> str | None:
    """The function's source (decorators included) with its docstring statement removed."""
    import textwrap

    doc = node.body[0]
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    lines = [line for i, line in enumerate(source_lines[first - 1:node.end_lineno], first)
             if not doc.lineno <= i <= doc.end_lineno]
    if len(node.body) < 2 or source_lines[node.lineno - 1].rstrip().endswith('"""'):
        return None  # nothing but the docstring, or a one-line def whose docstring shares the line
    return textwrap.dedent("".join(lines)).strip("\n")


@functools.lru_cache(maxsize=32768)
def _function_pairs(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, str], ...]:
    """``(function source without its docstring, docstring)`` for a file's documented
    functions, in source order. Memoised like :func:`_file_prose`."""
    import inspect

    source = _read(Path(path))
    if not source or ('"""' not in source and "'''" not in source):
        return ()
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ()
    lines = source.splitlines(keepends=True)
    out = []
    for node in _docstring_nodes(tree.body):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc = inspect.cleandoc(ast.get_docstring(node, clean=False))
        if not MIN_FUNCTION_DOC_CHARS <= len(doc) <= MAX_FUNCTION_DOC_CHARS or not _is_english(doc):
            continue
        if sum(_code_line_flags(doc.splitlines())) > MAX_CODE_LINE_FRACTION * max(len(doc.splitlines()), 1):
            continue  # a doctest, not a description
        code = _without_docstring(lines, node)
        if code and MIN_FUNCTION_CODE_CHARS <= len(code) <= MAX_FUNCTION_CODE_CHARS and '"""' not in code:
            try:  # a string literal at column 0 inside the body defeats dedent: skip those
                ast.parse(code)
            except (SyntaxError, ValueError):
                continue
            out.append((code, doc))
    return tuple(out)


def _file_functions(key: str, path: Path) -> tuple[tuple[str, str], ...]:
    stat = path.stat()
    return _function_pairs(str(path), stat.st_size, stat.st_mtime_ns)


def docstring_prompt(code: str) -> str:
    """What the model reads before it writes the docstring: the instruction, then the code."""
    return f"{INSTRUCTIONS['docstring']}\n\n```python\n{code}\n```\n\nDocstring:\n"


def pairs(domain: str, split: str, n: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` ``(prompt, completion)`` pairs of the instruction-driven ``docstring`` domain:
    the prompt is :func:`docstring_prompt` of a standard-library function without its
    docstring, the completion the docstring. Split by file like code and prose; a pure
    function of the arguments and the Python installation, and ``pairs(..., n)`` is a prefix
    of ``pairs(..., n + k)``. Raises ValueError when fewer than ``n`` exist."""
    _check(domain, split)
    if domain != "docstring":
        raise ValueError(f"domain {domain!r} has texts, not prompt/completion pairs: use texts()")
    if n < 0:
        raise ValueError(f"{domain}/{split}: need n >= 0, got n={n}")
    found = _all_pairs(split, seed, n)
    if len(found) < n:
        raise ValueError(f"only {len(found)} {domain}/{split} pairs are available, {n} requested")
    return found


def _all_pairs(split: str, seed: int, limit: int | None) -> list[tuple[str, str]]:
    paths = _split_sources("prose", split)
    shared = _shared_contents()
    seen: set[str] = set()  # membership only, never iterated
    out: list[tuple[str, str]] = []
    for key in _seeded_order(paths, seed, "docstring-files"):
        taken = 0
        for code, doc in _file_functions(key, paths[key]):
            content = _content_key(doc)
            if content in shared or content in seen or taken == MAX_FUNCTIONS_PER_FILE:
                continue
            seen.add(content)
            out.append((docstring_prompt(code), doc))
            taken += 1
            if limit is not None and len(out) == limit:
                return out
    return out


def _pack(items: Iterable[str], min_chars: int, limit: int | None, sep: str = "\n\n") -> list[str]:
    """Concatenate consecutive items into texts of at least ``min_chars`` characters.

    Stops after ``limit`` texts, so only as much of a lazy stream is read as needed.
    """
    texts, current = [], []
    for item in items:
        if limit is not None and len(texts) >= limit:
            break
        current.append(item)
        if sum(map(len, current)) + len(sep) * (len(current) - 1) >= min_chars:
            texts.append(sep.join(current))
            current = []
    return texts


# ------------------------------------------------------------------------------- math

TEMPLATES = ("shopping", "sharing", "speed", "multistep", "percent")
#: held-out problems are of kinds never seen in training (not only new numbers and names)
SPLIT_TEMPLATES = {"train": ("shopping", "sharing", "multistep"), "heldout": ("speed", "percent")}

# Disjoint name sets: every problem names a person, so no held-out problem can equal a
# training problem even if the two seed streams happened to draw the same numbers.
NAMES = {
    "train": ("Ava", "Liam", "Emma", "Noah", "Olivia", "Lucas", "Mia", "Ethan", "Sofia", "Mason", "Chloe", "Owen",
              "Grace", "Leo", "Ruby", "Jack", "Nora", "Henry", "Zoe", "Samuel"),
    "heldout": ("Priya", "Kenji", "Amara", "Tomas", "Ingrid", "Rafael", "Yuki", "Dmitri", "Leila", "Kwame",
                "Elif", "Mateo"),
}
_ITEMS = (("notebooks", 2, 6), ("pens", 1, 3), ("apples", 1, 2), ("books", 8, 20), ("shirts", 10, 25),
          ("mugs", 4, 9), ("tickets", 5, 15), ("sandwiches", 3, 8), ("balls", 2, 7), ("pencil cases", 3, 9))
_FRUITS = ("apples", "oranges", "cookies", "marbles", "stickers", "strawberries", "cards", "pencils")
_TRAVEL = (("cycles", "km"), ("drives", "km"), ("walks", "km"), ("runs", "km"), ("rows a boat", "km"))
_GOODS = ("jacket", "bicycle", "lamp", "backpack", "pair of shoes", "tablet", "chair", "guitar")


def _shopping(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    picks = rng.sample(_ITEMS, rng.randint(2, 3))
    bought = [(item, rng.randint(2, 9), rng.randint(lo, hi)) for item, lo, hi in picks]
    parts = [f"{q} {items} at ${p} each" for items, q, p in bought]
    steps = [f"The {items} cost {q} × ${p} = ${q * p}." for items, q, p in bought]
    costs = [q * p for _, q, p in bought]
    total = sum(costs)
    steps.append(f"Altogether that is {' + '.join(f'${c}' for c in costs)} = ${total}.")
    question = f"{name} buys {', '.join(parts[:-1])} and {parts[-1]}."
    if rng.random() < 0.5:
        budget = total + rng.randint(1, 40)
        question = f"{name} has ${budget}. " + question
        steps.append(f"The money left is ${budget} - ${total} = ${budget - total}.")
        return question + f" How much money does {name} have left?", steps, budget - total
    return question + f" How much does {name} spend in total?", steps, total


def _sharing(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    things, people, each = rng.choice(_FRUITS), rng.randint(2, 8), rng.randint(2, 12)
    bags = rng.choice([b for b in range(2, 10) if (people * each) % b == 0])  # people itself qualifies
    per_bag = people * each // bags
    total = bags * per_bag
    steps = [f"{name} has {bags} × {per_bag} = {total} {things}."]
    extra = rng.randint(1, people - 1) if rng.random() < 0.5 else 0
    found = f" and finds {extra} more" if extra else ""
    if extra:
        steps.append(f"With the extra ones that is {total} + {extra} = {total + extra}.")
        total += extra
    each, left = divmod(total, people)
    question = (f"{name} has {bags} bags with {per_bag} {things} in each bag{found}. {name} shares them equally "
                f"among {people} friends. How many {things} does each friend get?")
    if left:
        be = "is" if left == 1 else "are"
        steps.append(f"Since {people} × {each} + {left} = {total}, each friend gets {each} and {left} {be} left over.")
    else:
        steps.append(f"Each friend gets {total} ÷ {people} = {each}.")
    return question, steps, each


def _speed(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    verb, unit = rng.choice(_TRAVEL)
    speed, hours = rng.randint(3, 60), rng.randint(2, 8)
    distance = speed * hours
    kind = rng.choice(("distance", "time", "speed", "two legs"))
    if kind == "distance":
        return (f"{name} {verb} at {speed} {unit} per hour for {hours} hours. How far does {name} travel?",
                [f"Distance is speed times time: {speed} × {hours} = {distance} {unit}."], distance)
    if kind == "time":
        return (f"{name} {verb} {distance} {unit} at a steady {speed} {unit} per hour. "
                "How many hours does the trip take?",
                [f"Time is distance divided by speed: {distance} ÷ {speed} = {hours} hours."], hours)
    if kind == "speed":
        return (f"{name} {verb} {distance} {unit} in {hours} hours. What is the average speed in {unit} per hour?",
                [f"Speed is distance divided by time: {distance} ÷ {hours} = {speed} {unit} per hour."], speed)
    speed2, hours2 = rng.randint(3, 60), rng.randint(1, 5)
    second = speed2 * hours2
    return (f"{name} {verb} at {speed} {unit} per hour for {hours} hours, then at {speed2} {unit} per hour for "
            f"{hours2} more hours. How far does {name} go altogether?",
            [f"The first part is {speed} × {hours} = {distance} {unit}.",
             f"The second part is {speed2} × {hours2} = {second} {unit}.",
             f"Altogether {distance} + {second} = {distance + second} {unit}."], distance + second)


def _multistep(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    things = rng.choice(_FRUITS)
    start, packs, per_pack = rng.randint(5, 60), rng.randint(2, 6), rng.randint(3, 12)
    gained = packs * per_pack
    given = rng.randint(1, start + gained - 1)
    after = start + gained
    setup = (f"{name} has {start} {things}. {name} then buys {packs} packs with {per_pack} {things} in each "
             f"pack and gives {given} {things} to a friend.")
    steps = [f"The packs hold {packs} × {per_pack} = {gained} {things}.",
             f"After buying, {name} has {start} + {gained} = {after}.",
             f"After giving some away, {after} - {given} = {after - given}."]
    answer = after - given
    if rng.random() < 0.4:
        times = rng.randint(2, 4)
        setup += f" Later a game multiplies the number of {things} by {times}."
        steps.append(f"Multiplying by {times} gives {answer} × {times} = {answer * times}.")
        answer *= times
    return setup + f" How many {things} does {name} have now?", steps, answer


def _percent(rng: random.Random, name: str) -> tuple[str, list[str], int]:
    percent = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75))
    if rng.random() < 0.5:
        price = 20 * rng.randint(1, 30)
        good = rng.choice(_GOODS)
        off = price * percent // 100
        return (f"A {good} costs ${price}. {name} buys it during a sale with {percent}% off. How much does {name} pay?",
                [f"The discount is {price} × {percent} ÷ 100 = ${off}.",
                 f"{name} pays ${price} - ${off} = ${price - off}."],
                price - off)
    total = 20 * rng.randint(1, 20)
    part = total * percent // 100
    return (f"{name}'s school has {total} students, and {percent}% of them play in the orchestra. "
            f"How many students do not play in the orchestra?",
            [f"{percent}% of {total} is {total} × {percent} ÷ 100 = {part}.",
             f"So {total} - {part} = {total - part} do not play."],
            total - part)


_GENERATORS: dict[str, Callable[[random.Random, str], tuple[str, list[str], int]]] = {
    "shopping": _shopping, "sharing": _sharing, "speed": _speed, "multistep": _multistep, "percent": _percent,
}


def problem(rng: random.Random, template: str, split: str = "train") -> tuple[str, int]:
    """One word problem as ``(text, answer)``; ``text`` ends with ``Answer: <answer>``.

    The text is the question, then one sentence per step, each step's arithmetic written
    out as ``a × b = c`` so the worked solution can be checked mechanically.
    """
    if template not in _GENERATORS:
        raise ValueError(f"unknown math template {template!r}; expected one of {TEMPLATES}")
    _check("math", split)
    if template not in SPLIT_TEMPLATES[split]:
        raise ValueError(f"math template {template!r} belongs to the other split, not {split!r} "
                         f"(its templates: {SPLIT_TEMPLATES[split]})")
    question, steps, answer = _GENERATORS[template](rng, rng.choice(NAMES[split]))
    return f"Question: {question}\nSolution: {' '.join(steps)}\nAnswer: {answer}", answer


def _math_text(split: str, seed: int, index: int, min_chars: int) -> str:
    """Text ``index`` of the split: problems concatenated up to ``min_chars``.

    Its generator is seeded from sha256("math|split|seed|index"), so the held-out stream
    is disjoint from the training one and text ``i`` does not depend on how many are asked for.
    """
    rng = random.Random(_digest(f"math|{split}|{seed}|{index}"))
    problems: list[str] = []
    while sum(map(len, problems)) + 2 * len(problems) < min_chars + 2:
        problems.append(problem(rng, rng.choice(SPLIT_TEMPLATES[split]), split)[0])
    return "\n\n".join(problems)


# -------------------------------------------------------------------------------- API


def _check(domain: str, split: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for domain {domain!r}; expected one of {SPLITS}")


def _all_texts(domain: str, split: str, limit: int | None, min_chars: int, seed: int) -> list[str]:
    if domain == "docstring":
        raise ValueError("domain 'docstring' has prompt/completion pairs, not texts: use pairs()")
    if domain == "code":
        found = _code_texts(split, seed, min_chars)
        return found if limit is None else found[:limit]
    return _pack(_prose_stream(split, seed), min_chars, limit)


def available(domain: str, split: str, *, min_chars: int = 1200, seed: int = 0) -> int | None:
    """How many texts ``texts`` can return; None for math, which is generated without limit.

    For prose this parses every installed source file (tens of seconds the first time).
    The prose count can differ by a few between seeds, as the order decides how
    docstrings pack into texts.
    """
    _check(domain, split)
    if domain == "docstring":
        return len(_all_pairs(split, seed, None))
    return None if domain == "math" else len(_all_texts(domain, split, None, min_chars, seed))


def texts(domain: str, split: str, n: int, *, min_chars: int = 1200, seed: int = 0) -> list[str]:
    """``n`` texts of ``domain`` ("code", "prose", "math") from ``split`` ("train", "heldout").

    Each text has at least ``min_chars`` characters: a window of whole lines of one stdlib
    file (code), consecutive prose docstrings (prose), or several worked word problems
    (math). The result is a pure function of the arguments and the installed files, and
    ``texts(..., n)`` is a prefix of ``texts(..., n + k)``. (``docstring`` has
    prompt/completion pairs instead: :func:`pairs`.) ``seed`` reorders which files
    and windows come first; it never moves a file between splits.

    Raises ValueError on an unknown domain or split, and when fewer than ``n`` texts exist.
    """
    _check(domain, split)
    if n < 0 or min_chars < 1:
        raise ValueError(f"{domain}/{split}: need n >= 0 and min_chars >= 1, got n={n}, min_chars={min_chars}")
    if domain == "math":
        return [_math_text(split, seed, i, min_chars) for i in range(n)]
    found = _all_texts(domain, split, n, min_chars, seed)
    if len(found) < n:
        raise ValueError(
            f"only {len(found)} {domain}/{split} texts of >= {min_chars} chars are available, {n} requested"
        )
    return found


def write_jsonl(path: str | os.PathLike[str], records: Iterable[str | dict]) -> int:
    """Write one ``{"text": ...}`` JSON object per line (utf-8, sorted keys); returns the count.

    A record may be a string (wrapped as ``{"text": record}``) or a ready dict.
    """
    count = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            obj = {"text": record} if isinstance(record, str) else record
            f.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write DIR/{domain}-{split}.jsonl files")
    parser.add_argument("--n", type=int, default=200, help="texts per file written with --out (default 200)")
    parser.add_argument("--min-chars", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    for domain in DOMAINS:
        for split in SPLITS:
            start = time.perf_counter()
            count = available(domain, split, min_chars=args.min_chars, seed=args.seed)
            if domain == "docstring":
                get = lambda n: [{"prompt": p, "completion": c} for p, c in pairs(domain, split, n, seed=args.seed)]  # noqa: E731
                what = "prompt/completion pairs"
            else:
                get = lambda n: texts(domain, split, n, min_chars=args.min_chars, seed=args.seed)  # noqa: E731
                what = f"texts of >= {args.min_chars} chars"
            first = get(1)[0]
            shown = "unlimited (generated)" if count is None else str(count)
            seconds = time.perf_counter() - start
            print(f"== {domain}/{split}: {shown} {what} ({seconds:.1f} s)")
            print("   " + repr(str(first)[:200]))
            if args.out:
                path = os.path.join(args.out, f"{domain}-{split}.jsonl")
                write_jsonl(path, get(args.n))
                print(f"   wrote {args.n} records to {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
