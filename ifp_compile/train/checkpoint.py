"""Checkpoints: safetensors for every tensor, JSON for everything else. Never pickles.

    CKPT/predictor.safetensors   the predictor's own parameters (the MLP head, and a
                                 separate encoder's); weights shared with the LLM are not
                                 repeated here
    CKPT/llm.safetensors         the LLM's parameters, only when the LLM is trained
    CKPT/optimizer.safetensors   AdamW moments and step counts, by parameter position
    CKPT/state.json              step, the loss log so far, optimizer hyper-parameters,
                                 the training config and the predictor's shape

A checkpoint directory is written under a temporary name and renamed into place; the
next run puts back a previous checkpoint that a kill left moved aside (``recover``), so
a killed run never loses its last complete checkpoint. Loading checks every tensor's name
and shape and names each mismatch (a checkpoint of another model fails clearly).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..artifacts import atomic_write, dump_json, replace_dir
from .config import TrainError


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())})
    atomic_write(path, data)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise TrainError(f"checkpoint file {path} cannot be read: {e}") from None


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON-able rest) of an optimizer's state dict."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{idx}.{key}"] = torch.as_tensor(value)
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = rest["param_groups"]
    mine = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in mine]:
        raise TrainError("checkpoint optimizer state is for a different set of trainable parameters "
                         f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in mine]} per group)")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(directory: Path, *, predictor_params: dict[str, torch.Tensor],
                    llm_params: dict[str, torch.Tensor] | None, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_tensors(predictor_params, tmp / "predictor.safetensors")
    if llm_params is not None:
        _save_tensors(llm_params, tmp / "llm.safetensors")
    opt_tensors, opt_rest = optimizer_tensors(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    atomic_write(tmp / "state.json", dump_json({**state, "optimizer": opt_rest}))
    replace_dir(tmp, directory)


def load_into(params: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Copy a safetensors file into ``params`` (same names, same shapes) in place."""
    loaded = _load_tensors(path)
    problems = []
    for name in sorted(set(params) | set(loaded)):
        if name not in loaded:
            problems.append(f"{name}: missing from the checkpoint")
        elif name not in params:
            problems.append(f"{name}: in the checkpoint but not in the {what}")
        elif tuple(loaded[name].shape) != tuple(params[name].shape):
            problems.append(f"{name}: checkpoint shape {tuple(loaded[name].shape)}, "
                            f"{what} shape {tuple(params[name].shape)}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise TrainError(f"checkpoint {path} does not match the {what} (a checkpoint of another model?): {shown}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded[name].to(p.dtype))


def sha256_of(path: Path) -> str:
    from ..artifacts import sha256_file

    return sha256_file(path)


def read_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / "state.json"
    if not path.is_file():
        raise TrainError(f"{directory} is not an ifp-compile training checkpoint (no state.json)")
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        raise TrainError(f"{path}: malformed ({e})") from None
    missing = [k for k in ("step", "losses", "config", "optimizer") if k not in state]
    if missing:
        raise TrainError(f"{path}: malformed (missing {', '.join(missing)})")
    return state


def recover(directory: Path) -> None:
    """Undo what a run killed while saving left behind.

    ``replace_dir`` moves the old checkpoint aside before renaming the new one into
    place; a kill between the two leaves only the aside copy, which is put back here.
    Half-written temporary directories are removed.
    """
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    for tmp in parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    aside = sorted(parent.glob(f".old-{directory.name}-*"))
    if aside and not directory.exists():
        os.replace(aside[-1], directory)
        aside = aside[:-1]
    for old in aside:
        shutil.rmtree(old, ignore_errors=True)


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    restore_optimizer(optimizer, _load_tensors(Path(directory) / "optimizer.safetensors"), state["optimizer"])
