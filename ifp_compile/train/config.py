"""The training configuration: one JSON file, validated up front.

Why JSON and a dataclass: the same file drives ``ifp-compile train --config``, ``python
-m ifp_compile.train`` and every ``torchrun`` rank, and it is saved beside each
checkpoint, so a checkpoint says exactly how it was made. Relative paths are resolved
against the config file's directory, so a config and its data can move together.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import IFPError


class TrainError(IFPError):
    """Bad training input: config, data, checkpoint or keep counts."""


PREDICTOR_INPUTS = ("text", "instruction", "constant")


@dataclass
class PredictorConfig:
    #: encoder = the first ``encoder_layers`` decoder layers of the target model (shared
    #: weights); ignored when ``encoder_model`` names a separate Hugging Face model
    encoder_layers: int = 4
    encoder_model: str | None = None
    mlp_hidden: int = 128
    temperature: float = 1.0
    iterations: int = 30
    #: straight-through gradient for channels the top-k drops (see SoftTopK); False is
    #: the exact gradient, under which a first selection can never change
    straight_through: bool = True
    #: "random" (the paper) or "static": start from GRIFFIN's rule over the first
    #: ``init_examples`` training texts (the head's bias = those channel scores)
    init: str = "random"
    init_examples: int = 16
    init_scale: float = 4.0
    #: what the predictor reads: "text" (the input's own first tokens: per-input masks),
    #: "instruction" (the record's "instruction": per-task masks) or "constant" (one fixed
    #: input for every example: a static mask, learned with the same budget)
    input: str = "text"
    #: "ifpredictor" (encoder + head + SoftTopK) or "scales": the static calibrated channel
    #: set (GRIFFIN over the first ``init_examples`` examples) kept fixed, only one scale per
    #: kept channel learned -- the control that separates choosing channels from scaling them
    kind: str = "ifpredictor"


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "default"
    #: precision the LLM is loaded and trained in: null (the model's own; float32 for GGUF),
    #: "float32", "bfloat16" or "float16". The predictor's head runs in float32 regardless.
    dtype: str | None = None
    #: None: the model's own tokenizer; "bytes": UTF-8 bytes modulo the vocabulary (tests)
    tokenizer: str | None = None
    stage: int = 1
    keep: float | list[int] = 0.5
    train_llm: bool = False
    chunk_tokens: int = 64
    max_tokens: int = 256
    batch_size: int = 4
    steps: int = 100
    lr: float = 1e-3
    llm_lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    save_every: int = 0
    resume: bool = True
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(cfg: TrainConfig, where: str) -> None:
    def bad(name: str, why: str) -> TrainError:
        return TrainError(f"{where}: {name} {why}")

    if cfg.stage not in (1, 2):
        raise bad("stage", f"must be 1 (continued pre-training) or 2 (instruction tuning), got {cfg.stage!r}")
    for name in ("chunk_tokens", "max_tokens", "batch_size", "steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(name, f"must be a positive int, got {v!r}")
    if cfg.stage == 1 and cfg.max_tokens < 2 * cfg.chunk_tokens:
        raise bad("max_tokens", f"({cfg.max_tokens}) must hold two chunks of chunk_tokens ({cfg.chunk_tokens})")
    for name in ("lr", "llm_lr", "grad_clip"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or v <= 0:
            raise bad(name, f"must be > 0, got {v!r}")
    if not isinstance(cfg.save_every, int) or isinstance(cfg.save_every, bool) or cfg.save_every < 0:
        raise bad("save_every", f"must be an int >= 0 (0 = only at the end), got {cfg.save_every!r}")
    if not isinstance(cfg.weight_decay, (int, float)) or cfg.weight_decay < 0:
        raise bad("weight_decay", f"must be >= 0, got {cfg.weight_decay!r}")
    if cfg.dtype is not None:
        from ..dtypes import parse_dtype
        from ..errors import IFPError

        try:
            parse_dtype(cfg.dtype)
        except IFPError as e:
            raise bad("dtype", str(e).removeprefix("dtype ")) from None
    if cfg.tokenizer not in (None, "bytes"):
        raise bad("tokenizer", f"must be null (the model's) or \"bytes\", got {cfg.tokenizer!r}")
    p = cfg.predictor
    if p.init not in ("random", "static"):
        raise bad("predictor.init", f"must be \"random\" or \"static\", got {p.init!r}")
    if p.input not in PREDICTOR_INPUTS:
        raise bad("predictor.input", f"must be one of {', '.join(PREDICTOR_INPUTS)}, got {p.input!r}")
    if p.kind not in ("ifpredictor", "scales"):
        raise bad("predictor.kind", f"must be \"ifpredictor\" or \"scales\", got {p.kind!r}")
    if p.kind == "scales" and p.init != "static":
        raise bad("predictor.init", "must be \"static\" for predictor.kind \"scales\" (its channel set is the "
                  "static calibrated one)")
    if p.encoder_model is None and (not isinstance(p.encoder_layers, int) or p.encoder_layers < 1):
        raise bad("predictor.encoder_layers", f"must be a positive int, got {p.encoder_layers!r}")
    for name in ("mlp_hidden", "iterations", "init_examples"):
        v = getattr(p, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"predictor.{name}", f"must be a positive int, got {v!r}")
    for name in ("temperature", "init_scale"):
        v = getattr(p, name)
        if not isinstance(v, (int, float)) or v <= 0:
            raise bad(f"predictor.{name}", f"must be > 0, got {v!r}")


def config_from_dict(raw: dict[str, Any], *, where: str = "config", base_dir: Path | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig`; unknown keys are errors (a typo must not be ignored)."""
    if not isinstance(raw, dict):
        raise TrainError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    pred_raw = raw.pop("predictor", {}) or {}
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"predictor"}
    known_pred = {f.name for f in dataclasses.fields(PredictorConfig)}
    unknown = sorted(set(raw) - known) + [f"predictor.{k}" for k in sorted(set(pred_raw) - known_pred)]
    if unknown:
        raise TrainError(f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = [k for k in ("data", "out") if k not in raw]
    if missing:
        raise TrainError(f"{where}: missing required key(s) {', '.join(missing)}")
    if base_dir is not None:
        for key in ("data", "out"):
            raw[key] = str((base_dir / raw[key]).resolve()) if not Path(raw[key]).is_absolute() else raw[key]
        for key, holder in (("model", raw), ("encoder_model", pred_raw)):
            v = holder.get(key)
            if v not in (None, "default") and not Path(v).is_absolute() and (base_dir / v).exists():
                holder[key] = str((base_dir / v).resolve())
    try:
        cfg = TrainConfig(**raw, predictor=PredictorConfig(**pred_raw))
    except TypeError as e:  # pragma: no cover - unknown keys are caught above
        raise TrainError(f"{where}: {e}") from None
    _check(cfg, where)
    return cfg


def load_config(path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"config {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise TrainError(f"config {path}: not valid JSON ({e})") from None
    return config_from_dict(raw, where=f"config {path}", base_dir=path.parent)
