"""Locks of a build directory: one per task, and a short one for what tasks share.

Why per task: a build system runs one ``ifp-compile build --only NAME`` per target, many at
once (``make -j``), all into one directory. They share the base (``DIR/base``, written once)
and ``index.json``; everything else belongs to one task. So:

* ``DIR/.lock`` is held while the base is checked or written, leftovers are removed and
  ``index.json`` is rewritten: short, and waited for (a second build waits for the first
  to finish the base it needs, instead of failing);
* ``DIR/.locks/NAME.lock`` is held while task NAME is assembled and published. A build
  that finds it taken builds its other tasks first and then waits for it, and finds it up
  to date when the other build published it: a task is never built twice at once.

``flock`` locks are released by the kernel when their process dies, so a killed build
never leaves a stale lock; its temporary directories (``DIR/.tmp-task-NAME-PID``) are
removed by the next build that takes NAME's lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .progress import status

LOCKS = ".locks"
BASE_LOCK = ".lock"
TASK_TMP = ".tmp-task-"
BASE_TMP = ".tmp-base-"


def task_tmp(out: Path, name: str) -> Path:
    """Where this process assembles task ``name`` before publishing it."""
    return out / f"{TASK_TMP}{name}-{os.getpid()}"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_CREAT | os.O_RDWR, 0o644)


@contextmanager
def shared_state_lock(out: Path):
    """``DIR/.lock``: the base, leftovers and ``index.json``; waits for another build."""
    fd = _open(out / BASE_LOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with status(f"waiting for another build of {out} (its base or index)"):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class TaskLock:
    """``DIR/.locks/NAME.lock``, taken without waiting (:meth:`try_acquire`) or waiting
    (:meth:`acquire`); :meth:`release` also happens when the process dies."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        fd = _open(self.out / LOCKS / f"{self.name}.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        self._remove_leftovers()
        return True

    def acquire(self) -> None:
        fd = _open(self.out / LOCKS / f"{self.name}.lock")
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.fd = fd
        self._remove_leftovers()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _remove_leftovers(self) -> None:
        """Temporary directories of this task left by killed builds (the lock is ours, so
        no live process is writing them)."""
        for d in self.out.glob(f"{TASK_TMP}{self.name}-*"):
            if d.name.rsplit("-", 1)[0] == f"{TASK_TMP}{self.name}":
                shutil.rmtree(d, ignore_errors=True)


def remove_stale_leftovers(out: Path) -> None:
    """Leftovers of killed builds whose owner is surely gone: base temporaries (call with
    :func:`shared_state_lock` held), temporaries of tasks whose lock is free, and the
    ``.old-*`` directories an interrupted replacement leaves."""
    for d in out.glob(".old-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in out.glob(".tmp-*"):
        if not d.name.startswith(TASK_TMP):  # the base's, or a task's of an older ifp-compile
            shutil.rmtree(d, ignore_errors=True)
    for d in out.glob(f"{TASK_TMP}*"):
        name = d.name[len(TASK_TMP):].rsplit("-", 1)[0]
        lock = TaskLock(out, name)
        if lock.try_acquire():  # removes this task's leftovers
            lock.release()
    for d in (out / "tasks").glob(".old-*"):
        shutil.rmtree(d, ignore_errors=True)
