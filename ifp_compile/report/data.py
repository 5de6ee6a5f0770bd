"""Reading a build or an eval directory into one in-memory structure.

Both kinds of directory answer the same two questions -- how many channels does each task
keep per layer, and how much do tasks' kept channels overlap -- so both are read into a
:class:`ReportData`; figures and HTML never look at the files. Everything is validated
here, before anything is drawn, and every bad input is a :class:`ReportError` naming the
file (and the task or tensor key) at fault.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IFPError, MaskError
from .overlap import Overlap, domain_overlap, task_overlap

#: rows whose masks are not per task (for eval.json files that do not say, from before
#: rows carried "per_task"): no task-by-task overlap to draw
NOT_PER_TASK = ("dense", "static")
SPEED_FILE = "speed.json"
MASK_KEY = re.compile(r"^([^/]+)/([^/]+)/ffn\.(\d+)$")


class ReportError(IFPError):
    """A report input (directory, JSON, mask file, --out, --speed) is missing or malformed."""


@dataclass
class KeptWidth:
    """Kept channels per layer of one task (an eval "task" is a row kind on one domain)."""

    label: str
    group: str  # what shares a colour: the task (build) or the row kind (eval)
    member: str  # what shares a marker within a group: "" (build) or the domain (eval)
    per_layer: list[float]


@dataclass
class ReportData:
    kind: str  # "build" or "eval"
    directory: Path
    facts: list[tuple[str, str]]  # the header's key/value lines
    widths: list[int]  # dense FFN width per layer
    kept: list[KeptWidth]
    overlaps: list[Overlap]
    tasks: dict[str, dict] = field(default_factory=dict)  # build: index.json entries + manifest facts
    same_masks: list[list[str]] = field(default_factory=list)  # build: tasks with identical kept sets
    evaluation: dict | None = None  # eval: eval.json as read
    speed: dict | None = None
    speed_source: str | None = None


def read_json(path: Path, what: str = "") -> Any:
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise ReportError(f"{label}: no such file")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ReportError(f"{label}: not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{label}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ReportError(message)


def _int_list(value, where: str) -> list[int]:
    _expect(isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
            f"{where} must be a list of integers, got {str(value)[:60]}")
    return value


# --------------------------------------------------------------------------------------
# build directories
# --------------------------------------------------------------------------------------
def read_build(directory: Path) -> ReportData:
    from ..build import MASK_FILE, read_mask_file

    index_path = directory / "index.json"
    index = read_json(index_path)
    _expect(isinstance(index, dict) and isinstance(index.get("tasks"), dict),
            f'{index_path}: "tasks" must be an object mapping task names to entries')
    names = sorted(index["tasks"])
    _expect(bool(names), f"{index_path}: no tasks (nothing to report)")
    widths: list[int] | None = None
    tasks: dict[str, dict] = {}
    masks: list[list[np.ndarray]] = []
    base_hashes = set()
    for name in names:
        entry = index["tasks"][name]
        _expect(isinstance(entry, dict), f"{index_path}: task {name!r} must be an object")
        task_dir = directory / str(entry.get("path", f"tasks/{name}"))
        manifest_path = task_dir / "manifest.json"
        manifest = read_json(manifest_path, f"task {name!r}:")
        _expect(isinstance(manifest, dict), f"{manifest_path}: must be a JSON object")
        w = _int_list(manifest.get("widths"), f'{manifest_path}: "widths"')
        if widths is None:
            widths, first = w, manifest_path
        _expect(w == widths, f"{manifest_path}: FFN widths {w[:4]}... differ from {first}'s {widths[:4]}... "
                             "(tasks of one build share one base model)")
        mask_path = task_dir / MASK_FILE
        _expect(mask_path.is_file(),
                f"task {name!r}: {mask_path} is missing; builds made before mask files were stored must be "
                f"rebuilt: remove {task_dir} and run ifp-compile build again (an up-to-date task is skipped)")
        try:
            bits = [np.asarray(m) != 0 for m in read_mask_file(str(mask_path), w)]
        except MaskError as e:
            raise ReportError(f"task {name!r}: {e}") from None
        counts = [int(b.sum()) for b in bits]
        recorded = manifest.get("kept_channels")
        _expect(recorded is None or recorded == counts,
                f"{mask_path}: keeps {counts} channels per layer, {manifest_path} says {recorded} "
                "(the mask file was replaced after the build?)")
        params = manifest.get("parameters") or entry.get("parameters") or {}
        tasks[name] = {"kept": counts, "parameters": params if isinstance(params, dict) else {},
                       "instruction": manifest.get("instruction", entry.get("instruction")),
                       "formats": manifest.get("formats")}
        base_hashes.add(str((manifest.get("inputs") or {}).get("base_model_sha256", "")))
        masks.append(bits)
    kept = [KeptWidth(n, n, "", [float(c) for c in tasks[n]["kept"]]) for n in names]
    facts = [("directory", str(directory)), ("kind", "build directory (ifp-compile build)"),
             ("tool version", str(index.get("tool_version", "unknown"))), ("tasks", str(len(names))),
             ("FFN layers", str(len(widths))), ("dense FFN channels", f"{sum(widths):,}")]
    if len(base_hashes) == 1 and "" not in base_hashes:
        facts.append(("base model sha256", next(iter(base_hashes))[:16] + "..."))
    overlap = task_overlap("tasks", names, masks)
    same: dict[bytes, list[str]] = {}
    for name, bits in zip(names, masks):
        same.setdefault(b"".join(np.packbits(b).tobytes() for b in bits), []).append(name)
    return ReportData("build", directory, facts, widths, kept, [overlap], tasks=tasks,
                      same_masks=[g for g in same.values() if len(g) > 1])


# --------------------------------------------------------------------------------------
# eval directories
# --------------------------------------------------------------------------------------
def read_eval_masks(path: Path) -> dict[str, dict[str, list[np.ndarray]]]:
    """``"<kind>/<domain>/ffn.<layer>"`` tensors -> ``masks[kind][domain][layer]`` (bool
    ``[n_examples, width]``); kinds, domains and layers are discovered from the keys, and
    every (kind, domain) must have the same layers and widths."""
    from safetensors.numpy import load_file

    if not path.is_file():
        raise ReportError(f"{path}: no such file (ifp-compile eval --out DIR writes it beside eval.json)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own (Rust) error type on corrupt files
        raise ReportError(f"{path}: not a safetensors file ({e})") from None
    _expect(bool(tensors), f"{path}: no mask tensors")
    grouped: dict[tuple[str, str], dict[int, tuple[str, np.ndarray]]] = {}
    for key in sorted(tensors):
        m = MASK_KEY.match(key)
        _expect(m is not None, f"{path}: tensor {key!r} is not named <kind>/<domain>/ffn.<layer>")
        t = tensors[key]
        _expect(t.ndim == 2 and t.shape[0] > 0,
                f"{path}: {key} has shape {t.shape}; expected [n_examples >= 1, width]")
        grouped.setdefault((m[1], m[2]), {})[int(m[3])] = (key, t)
    ref_name, ref = next(iter(grouped.items()))
    ref_widths = [ref[i][1].shape[1] for i in sorted(ref)]
    out: dict[str, dict[str, list[np.ndarray]]] = {}
    for (kind, domain), layers in grouped.items():
        prefix = f"{kind}/{domain}"
        missing = [i for i in range(max(layers) + 1) if i not in layers]
        _expect(not missing, f"{path}: {prefix}/ffn.{missing[0] if missing else 0} is missing "
                             f"(it has ffn.{max(layers)}; layers must be ffn.0 .. ffn.<L-1>)")
        _expect(len(layers) == len(ref_widths),
                f"{path}: {prefix} has {len(layers)} layers (ffn.0 .. ffn.{len(layers) - 1}), but "
                f"{'/'.join(ref_name)} has {len(ref_widths)}")
        n = layers[0][1].shape[0]
        for i in range(len(layers)):
            key, t = layers[i]
            _expect(t.shape[1] == ref_widths[i], f"{path}: {key} has width {t.shape[1]}, but "
                                                 f"{'/'.join(ref_name)}/ffn.{i} has {ref_widths[i]}")
            _expect(t.shape[0] == n, f"{path}: {key} has {t.shape[0]} examples, {prefix}/ffn.0 has {n}")
        out.setdefault(kind, {})[domain] = [layers[i][1] != 0 for i in range(len(layers))]
    return out


def _ordered(first: list[str], found) -> list[str]:
    """``first``'s order (eval.json's), then whatever else was found, sorted."""
    found = set(found)
    return [x for x in first if x in found] + sorted(found - set(first))


def read_eval(directory: Path) -> ReportData:
    path = directory / "eval.json"
    ev = read_json(path)
    _expect(isinstance(ev, dict), f"{path}: must be a JSON object")
    rows = ev.get("rows")
    _expect(isinstance(rows, list) and bool(rows), f'{path}: "rows" must be a non-empty list')
    for i, r in enumerate(rows):
        _expect(isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("kind"), str),
                f'{path}: rows[{i}] must be an object with string "name" and "kind"')
        _expect(r.get("loss") is None or isinstance(r["loss"], dict), f'{path}: rows[{i}] "loss" must be an object')
    domains = ev.get("domains") or []
    _expect(isinstance(domains, list) and all(isinstance(d, str) for d in domains),
            f'{path}: "domains" must be a list of names')
    summary = ev.get("summary")
    _expect(summary is None or (isinstance(summary, list) and all(isinstance(s, dict) for s in summary)),
            f'{path}: "summary" must be a list of objects')
    masks = read_eval_masks(directory / "masks.safetensors")
    kinds = _ordered([r["kind"] for r in rows], masks)
    all_domains = _ordered(domains, {d for k in masks.values() for d in k})
    widths = [int(m.shape[1]) for m in next(iter(next(iter(masks.values())).values()))]
    kept = [KeptWidth(f"{k}: {d}", k, d, [float(m.sum(1).mean()) for m in masks[k][d]])
            for k in kinds for d in all_domains if d in masks[k]]
    said = {r["kind"]: r.get("per_task") for r in rows}
    per_task = [k for k in kinds if (said.get(k) if isinstance(said.get(k), bool) else k not in NOT_PER_TASK)]
    overlaps = [domain_overlap(k, _ordered(all_domains, masks[k]), masks[k]) for k in per_task]
    examples = {d: masks[per_task[0]][d][0].shape[0] for d in all_domains if d in masks[per_task[0]]} if per_task else {}
    facts = [("directory", str(directory)), ("kind", "eval directory (ifp-compile eval --out)"),
             ("model", str(ev.get("model", "unknown"))), ("tool version", str(ev.get("tool_version", "unknown")))]
    if ev.get("keep") is not None:
        facts.append(("keep", str(ev["keep"])))
    facts += [("domains", f"{len(all_domains)}: {', '.join(all_domains)}"), ("rows", str(len(rows))),
              ("FFN layers", str(len(widths))), ("dense FFN channels", f"{sum(widths):,}")]
    if examples:
        facts.append((f"masked examples per domain ({per_task[0]})", ", ".join(f"{d} {n}" for d, n in examples.items())))
    return ReportData("eval", directory, facts, widths, kept, overlaps, evaluation=ev)


# --------------------------------------------------------------------------------------
# speed
# --------------------------------------------------------------------------------------
def read_speed(path: Path) -> dict:
    """A decode benchmark's JSON; rendered generically, so only its outer shape is checked."""
    data = read_json(path, "speed file")
    if isinstance(data, list) and all(isinstance(x, dict) for x in data):
        data = {"rows": data}
    _expect(isinstance(data, dict), f"speed file {path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_report_data(directory, speed=None) -> ReportData:
    """Read ``directory`` (a build or an eval directory) and the speed JSON, if any.

    ``speed`` defaults to ``directory/speed.json`` when that file exists.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"{directory}: no such directory" if not directory.exists()
                          else f"{directory}: not a directory (give a build or an eval directory)")
    is_build, is_eval = (directory / "index.json").is_file(), (directory / "eval.json").is_file()
    if is_build and is_eval:
        raise ReportError(f"{directory}: has both index.json (a build) and eval.json (an eval); "
                          "report one of them from a directory of its own")
    if not (is_build or is_eval):
        raise ReportError(f"{directory}: neither a build directory (no index.json, see ifp-compile build) "
                          "nor an eval directory (no eval.json, see ifp-compile eval --out)")
    data = read_build(directory) if is_build else read_eval(directory)
    if speed is None and (directory / SPEED_FILE).is_file():
        speed = directory / SPEED_FILE
    if speed is not None:
        data.speed, data.speed_source = read_speed(Path(speed)), str(speed)
    return data
