"""Progress reporting for long operations (export, specialization of many tasks).

Messages go to stderr so that stdout stays machine-readable; ``IFP_QUIET=1``
silences them (the test suite sets it).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def quiet() -> bool:
    return os.environ.get("IFP_QUIET", "") not in ("", "0")


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """Print ``message ...`` before a long step and its wall time after it."""
    if quiet():
        yield
        return
    print(f"[ifp] {message} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"[ifp] {message}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """A tqdm progress bar on stderr, or the bare iterable when quiet."""
    if quiet():
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, total=total, file=sys.stderr)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def byte_bar(total: int, description: str):
    """A tqdm bar counting bytes (``update(n)``, ``close()``); a silent one when quiet."""
    if quiet():
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)


def progress_bar(total: int, description: str):
    """A tqdm bar counting items with an ETA (``update(n)``, ``close()``); silent when quiet."""
    if quiet():
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="task", file=sys.stderr)
