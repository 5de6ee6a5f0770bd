"""``ifp-compile export-task``: one task of a build directory as a self-contained copy.

Why: a task directory in a build shares its common weights with the base through a hard
link, which costs no disk there but means nothing once the directory leaves the machine.
Shipping a task to a device needs a directory that holds real bytes for every file, can
be verified on its own and carries nothing the task does not read. ``export_task`` copies
the files the task's manifest lists (a link becomes a file of its own), checks every
sha256 of the copy against the manifest and only then renames it into place, so the
destination is either the whole verified task or absent.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .artifacts import ArtifactError, atomic_write, dump_json, sha256_file, verify_artifact
from .progress import progress


def export_task(build_dir, name: str, dest) -> dict:
    """Copy task ``name`` of ``build_dir`` to the new directory ``dest``; returns its manifest.

    The copy's manifest is the task's with ``base_linked`` / ``pt2_base_linked`` set to
    false (its files are its own); every other field, and every file, is byte for byte the
    task's, so two exports of one task are identical.
    """
    build_dir, dest = Path(build_dir), Path(dest)
    if not (build_dir / "index.json").is_file():
        raise ArtifactError(f"{build_dir}: not an ifp-compile build directory (no index.json)")
    tasks = json.loads((build_dir / "index.json").read_text())["tasks"]
    if name not in tasks:
        known = ", ".join(sorted(tasks)[:8]) + (" ..." if len(tasks) > 8 else "")
        raise ArtifactError(f"{build_dir}: no task named {name!r} (tasks: {known or 'none'})")
    if dest.exists() or dest.is_symlink():
        raise ArtifactError(f"{dest} already exists: export-task writes a new directory and never merges into one")
    if not dest.parent.is_dir():
        raise ArtifactError(f"{dest.parent}: no such directory to export into")
    source = build_dir / tasks[name]["path"]
    manifest = verify_artifact(source)
    tmp = dest.parent / f".tmp-export-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in progress(sorted(manifest["files"]), f"copying task {name}"):
            _copy_file(source / f, tmp / f)
            if sha256_file(tmp / f) != manifest["files"][f]:  # the copy, not the source, is what ships
                raise ArtifactError(f"{tmp / f}: the copy does not match the manifest's sha256 (disk error?)")
        manifest.update({k: False for k in ("base_linked", "pt2_base_linked") if k in manifest})
        atomic_write(tmp / "manifest.json", dump_json(manifest))
        _fsync_dir(tmp)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _copy_file(src: Path, dst: Path) -> None:
    """A new file (never a link) with ``src``'s bytes, flushed to disk."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)
        fout.flush()
        os.fsync(fout.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
