"""``ifp-compile build``: one artifact per task from one base model, for build systems.

A task is a pure function of (base model hash, mask) -- for an instruction task, of
(base model hash, instruction, keep, predictor) -- so:

* *incremental*: a task whose manifest records the same inputs is skipped, and when
  every task is up to date the model is not even loaded;
* *deduplicated*: tasks with identical masks hard-link one set of files;
* *deterministic*: the same inputs give byte-identical files (no timestamps, sorted JSON,
  deterministic protobuf serialisation, fixed tensor order and alignment);
* *resumable and concurrent*: each task is assembled in ``DIR/.tmp-task-NAME-PID`` and
  renamed into place as soon as it is complete, under its own lock (``build_locks``), so a
  killed build keeps every finished task and many builds (``make -j``, one ``--only NAME``
  each) share one directory; leftovers of a killed build are removed by the next one;
  task names are plain file names (``../x`` is refused);
* *per-task failures*: a task that cannot be built is reported with its reason and the
  others are built (``BuildReport.failed``; the CLI exits 1).

The base model is exported to ONNX once per base model hash (``DIR/base/``); each task
is ``specialize_onnx`` of it, so a task costs what slicing and writing its FFN weights
costs, not an export. With ``--format pt2`` the base program's parameters are written
once too (``DIR/base/parameters.safetensors``) and each task's ``program.pt2`` holds only
its graph, its own sliced parameters beside it (``artifacts.write_task_pt2``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .artifacts import (
    BASE_FFN,
    BASE_SHARED,
    FFN_BIN,
    LAYOUT,
    SHARED_BIN,
    SHARED_FILES,
    ArtifactError,
    atomic_write,
    dump_json,
    file_hashes,
    link_or_copy,
    replace_dir,
    sha256_file,
    verify_artifact,
    write_base,
    write_task_onnx,
    write_task_pt2,
)
from .build_locks import BASE_TMP, TaskLock, remove_stale_leftovers, shared_state_lock, task_tmp
from .errors import IFPError, InstructionError, MaskError
from .progress import progress, progress_bar, status

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
FORMATS = ("onnx", "pt2", "gguf", "pte")
TASK_GGUF = "model.gguf"  # a task's GGUF file (the gguf format)
TASK_PTE = "model.pte"  # a task's ExecuTorch program (the pte format)
TOKENIZER = "tokenizer.json"  # with pte: the tokenizer a runner needs, in base/ and linked into each task
DEFAULT_MAX_CACHE_LEN = 512


MASK_FILE = "mask.safetensors"


class BuildError(IFPError):
    """Bad build input: tasks file, model, output directory."""


# --------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    name: str
    instruction: str | None = None
    mask_file: str | None = None  # resolved path


def read_tasks(path) -> list[Task]:
    """Parse a tasks.jsonl; every error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"tasks file {path} does not exist")
    tasks: list[Task] = []
    seen: set[str] = set()
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BuildError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "name" not in obj:
            raise BuildError(f'{where}: a task is an object with "name" and "instruction" or "mask"')
        name = obj["name"]
        if not isinstance(name, str) or not NAME.match(name):
            raise BuildError(f"{where}: task name {name!r} must be a plain file name "
                             "(letters, digits, '.', '_', '-'; no '/' or leading '.')")
        if name in seen:
            raise BuildError(f"{where}: duplicate task name {name!r}")
        seen.add(name)
        unknown = set(obj) - {"name", "instruction", "mask"}
        if unknown:
            raise BuildError(f"{where}: unknown keys {sorted(unknown)}")
        has_i, has_m = "instruction" in obj, "mask" in obj
        if has_i == has_m:
            raise BuildError(f'{where}: task {name!r} needs exactly one of "instruction" and "mask"')
        if has_i:
            if not isinstance(obj["instruction"], str) or not obj["instruction"].strip():
                raise BuildError(f"{where}: task {name!r} has an empty instruction")
            tasks.append(Task(name, instruction=obj["instruction"]))
        else:
            mask = obj["mask"]
            if not isinstance(mask, str):
                raise BuildError(f"{where}: task {name!r}: mask must be a path to a .safetensors file")
            # a missing file fails this task when it is built, not the whole tasks file
            tasks.append(Task(name, mask_file=str((path.parent / mask).resolve())))
    if not tasks:
        raise BuildError(f"{path}: no tasks")
    return tasks


def read_mask_bytes(path: str) -> bytes:
    """A task's mask file, read once: its hash is the task's input and its masks are parsed
    from the same bytes, so a file replaced during a build cannot give a task masks that
    differ from the inputs its manifest records."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MaskError(f"mask file {path} does not exist") from None
    except OSError as e:
        raise MaskError(f"mask file {path} cannot be read: {e.strerror or e}") from None


def read_mask_file(path: str, widths: list[int], data: bytes | None = None):
    """Masks from a safetensors file with keys ``ffn.0 .. ffn.<n-1>`` (or from its bytes)."""
    from safetensors.numpy import load

    try:
        data = load(read_mask_bytes(path) if data is None else data)
    except MaskError:
        raise
    except Exception as e:  # safetensors raises its own (Rust) error type on corrupt files
        raise MaskError(f"mask file {path}: not a safetensors file ({e})") from None
    keys = sorted(data, key=lambda k: (len(k), k))
    expected = [f"ffn.{i}" for i in range(len(widths))]
    if keys != expected:
        raise MaskError(f"mask file {path} has tensors {keys[:4]}{'...' if len(keys) > 4 else ''}; this model "
                        f"has {len(widths)} FFN blocks, so it needs ffn.0 .. ffn.{len(widths) - 1}")
    out = []
    for i, w in enumerate(widths):
        m = data[f"ffn.{i}"]
        if m.shape != (w,):
            raise MaskError(f"mask file {path}: ffn.{i} has shape {m.shape}, the model's block {i} has width {w} "
                            "(a mask for a different model?)")
        out.append(m.astype(np.float32))
    return out


def mask_digest(masks) -> str:
    h = hashlib.sha256()
    for m in masks:
        a = np.ascontiguousarray(np.asarray(m, dtype=np.float32))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------
def model_kind(model: str) -> str:
    if model == "default":
        return "default"
    p = Path(model)
    if not p.exists():
        raise BuildError(f"model {model} does not exist (give a .pt2, .onnx, .gguf, a Hugging Face "
                         "directory, or 'default')")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BuildError(f"model directory {model} has no config.json (not a Hugging Face model)")
        return "hf"
    suffix = p.suffix.lower()
    if suffix in (".pt2", ".onnx", ".gguf"):
        return suffix[1:]
    raise BuildError(f"model {model}: unknown kind (expected .pt2, .onnx, .gguf, a directory, or 'default')")


def model_files(model: str) -> list[Path]:
    """The file(s) a model's identity is computed from."""
    if model == "default":
        from .real_model import GGUF_FILE, smollm2_dir

        return [Path(smollm2_dir()) / GGUF_FILE]
    p = Path(model)
    return [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())


def model_stat(model: str) -> list:
    """(relative name, size, modification time) of every model file: unchanged means the
    hash recorded in the base is still the model's (what ``make``-style tools trust too)."""
    files = model_files(model)
    root = Path(model) if model != "default" and Path(model).is_dir() else None
    rows = []
    for f in files:
        st = f.stat()
        rows.append([str(f.relative_to(root)) if root else f.name, st.st_size, st.st_mtime_ns])
    return rows


def model_hash_cached(model: str, base: dict, stat: list) -> str:
    """``model_hash``, or the one the base manifest ``base`` recorded for the same files
    (``stat``: same sizes and modification times): a one-task ``--only`` build of an 8B
    checkpoint then hashes nothing, instead of reading 16 GB per call."""
    if base.get("model_stat") is not None and base.get("model_stat") == stat:
        return base["base_model_sha256"]
    with status("hashing the base model"):
        return model_hash(model)


def _remember_model_stat(out: Path, stat: list, base_hash: str) -> None:
    data = _read_base_manifest(out)
    if data.get("base_model_sha256") == base_hash:
        data["model_stat"] = stat
        atomic_write(out / "base" / "manifest.json", dump_json(data))


def _read_base_manifest(out: Path) -> dict:
    try:
        return json.loads((out / "base" / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def model_hash(model: str) -> str:
    """sha256 over the model's file(s): what every task's identity is rooted in."""
    if model == "default":
        from .real_model import GGUF_FILE, smollm2_dir

        return sha256_file(Path(smollm2_dir()) / GGUF_FILE)
    p = Path(model)
    if p.is_file():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


class Source:
    """The base model, loaded lazily: only when some task needs (re)building.

    A Hugging Face checkpoint directory is captured *weightless* (``export_checkpoint``):
    no weight is read until an artifact is written, and then each tensor is streamed from
    the checkpoint into its file, sliced (``weights``). Other sources (the default model, a
    GGUF file, a saved ``.pt2``) are loaded into memory. ``dtype`` (None: the model's own;
    float32 for GGUF, whose weights are de-quantized) is what the artifacts compute in.
    """

    def __init__(self, model: str, keep: float, dtype=None, predictor: str | None = None):
        from .dtypes import parse_dtype

        self.model, self.kind, self.keep = model, model_kind(model), keep
        self.predictor_checkpoint = predictor  # a trained IFPredictor (``ifp-compile train``), or None
        self.dtype = None if dtype is None else parse_dtype(dtype)
        if self.dtype is not None and self.kind == "onnx":
            raise BuildError(f"model {model} is ONNX: it computes in the dtype it was exported with (--dtype applies "
                             "to models ifp-compile loads)")
        self._ep = self._predictor_program = self._tokenizer = self._onnx = self._model = self._step = None
        self._predictor = self._predictor_tokenizer = self._trained = None
        self.known_widths: list[int] | None = None  # from DIR/base: --only need not load the model

    def torch_model(self):
        """(HF model in memory, tokenizer) in ``dtype``: for training, evaluation and pruning."""
        import torch

        if self.kind == "default":
            from .real_model import load_smollm2

            return load_smollm2(dtype=self.dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.kind == "gguf":
            d, f = str(Path(self.model).parent), Path(self.model).name
            with status(f"loading {f}"):
                return (AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=self.dtype or torch.float32).eval(),
                        AutoTokenizer.from_pretrained(d, gguf_file=f))
        if self.kind != "hf":
            raise BuildError(f"model {self.model} is a .{self.kind} file, not a model ifp-compile can load")
        with status(f"loading {self.model}"):
            return (AutoModelForCausalLM.from_pretrained(self.model, dtype=self.dtype or "auto").eval(),
                    self.tokenizer())

    def decode_step(self, max_cache_len: int):
        """The decode-step program (static KV cache of ``max_cache_len``) the pte format lowers.

        It needs the model in memory (a Hugging Face directory is loaded, not streamed:
        ExecuTorch embeds every weight in the program anyway) in float32 or float16.
        """
        if self._step is None:
            if self.kind not in ("default", "hf", "gguf"):
                raise BuildError(f"model {self.model}: the pte format exports a decode step (KV cache inside) from a "
                                 "Hugging Face model: give a checkpoint directory, a GGUF file or 'default', not a "
                                 f".{self.kind} file")
            from .decode_step import export_decode_step
            from .pte import PteError, check_pte_dtype

            if self._model is None:
                self._model, tok = self.torch_model()
                self._tokenizer = self._tokenizer or tok
            try:
                check_pte_dtype(next(self._model.parameters()).dtype, f"model {self.model}")
            except PteError as e:
                raise BuildError(str(e)) from None
            self._step = export_decode_step(self._model, max_cache_len)
        return self._step

    def tokenizer(self):
        """The tokenizer of a Hugging Face directory, or None when it has no tokenizer files."""
        if not any((Path(self.model) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model)

    def programs(self):
        """(plain program, program with the predictor branch or None, tokenizer or None)."""
        if self._ep is None:
            import torch

            from .capture import export, export_checkpoint

            if self.kind == "onnx":
                raise BuildError(f"model {self.model} is ONNX: it can build mask tasks in ONNX format only")
            if self.kind == "pt2":
                from .graph_utils import INSTRUCTION_INPUT, user_input_nodes

                self._ep = torch.export.load(self.model)
                self._check_dtype(self._ep)
                has_pred = any(n.name == INSTRUCTION_INPUT for n in user_input_nodes(self._ep))
                self._predictor_program = self._ep if has_pred else None
            elif self.kind == "hf":
                with status(f"capturing {self.model} without its weights"):
                    self._ep = export_checkpoint(self.model, dtype=self.dtype)
                self._tokenizer = self.tokenizer()
            else:
                if self._model is None:
                    self._model, self._tokenizer = self.torch_model()
                self._ep = export(self._model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
        return self._ep, self._predictor_program, self._tokenizer

    def _check_dtype(self, ep) -> None:
        from .dtypes import name
        from .program_weights import parameters

        have = {t.dtype for t in parameters(ep).values() if t.is_floating_point()}
        if self.dtype is not None and have != {self.dtype}:
            raise BuildError(f"model {self.model} is a saved program in {', '.join(sorted(map(name, have)))}; "
                             f"--dtype {name(self.dtype)} applies to models ifp-compile loads (export it again in that dtype)")

    def dtype_name(self) -> str:
        """The dtype the artifacts compute in (recorded in every task's inputs)."""
        from .dtypes import name

        if self.dtype is not None:
            return name(self.dtype)
        return "model" if self.kind in ("pt2", "onnx", "hf") else "float32"

    def predictor(self):
        """What picks an instruction task's masks: ``(callable ids -> masks, tokenizer)``.

        A saved program with a predictor branch is evaluated up to its masks
        (``predict_masks``); any other model gets the prompt-activation predictor, called
        directly: the same masks as the branch ``insert_masks(ep, predictor=...)`` would
        carry (tests/test_real_model.py), without that branch's re-export (25 s for
        SmolLM2, per build). For a weightless program (a checkpoint directory) the
        predictor runs the model layer by layer, each weight read from the checkpoint
        while its operation runs (``weights.stream``).
        """
        if self._predictor is None and self.predictor_checkpoint is not None:
            self._load_trained_predictor()
        if self._predictor is None:
            ep, pred, tok = self.programs()
            if self.kind == "pt2":
                if pred is None:
                    return None, tok
                from .passes import find_ffn_blocks, predict_masks

                blocks = find_ffn_blocks(pred)
                self._predictor = lambda ids: predict_masks(pred, blocks, ids)
            else:
                from .predictors import PromptActivationPredictor

                with status("building the prompt-activation predictor"):
                    self._predictor = PromptActivationPredictor(ep, keep=self.keep)
        return self._predictor, self._predictor_tokenizer or self.programs()[2]

    def _load_trained_predictor(self) -> None:
        from .predictors.base import keep_counts
        from .train.config import TrainError
        from .train.trainer import load_predictor

        where = f"--predictor {self.predictor_checkpoint}"
        widths = self.widths()
        try:
            with status(f"loading the predictor {self.predictor_checkpoint}"):
                predictor, tok, _ = load_predictor(self.predictor_checkpoint, widths)
        except TrainError as e:
            raise BuildError(f"{where}: {e}") from None
        if predictor.counts != keep_counts(widths, self.keep):
            raise BuildError(f"{where} keeps {sum(predictor.counts)} of {sum(widths)} channels, --keep {self.keep} "
                             f"keeps {sum(keep_counts(widths, self.keep))}: pass the --keep it was trained with")
        self._predictor, self._predictor_tokenizer, self._trained = predictor, tok, predictor

    #: a trained predictor reads instructions in batches of this many rows, each padded to a
    #: multiple of this many tokens: a fixed shape per instruction length (below)
    PREDICTOR_BATCH, PREDICTOR_BUCKET = 8, 16

    def instruction_masks(self, tasks: list[Task]) -> dict[str, list[np.ndarray]]:
        """The masks of instruction ``tasks``; a trained predictor reads them in batches.

        Batches have one shape per instruction length: ``PREDICTOR_BATCH`` rows (unused rows
        are one padding token), each right-padded to the next multiple of
        ``PREDICTOR_BUCKET`` tokens. Why: a padded batch gives masks that differ from the
        same instruction's in another shape in the last bit (measured: 1.2e-7), and a task's
        bytes must not depend on which tasks were built with it (an ``--only`` build and a
        full build agree; tests/test_build_predictor.py). With the shape fixed, each row
        is computed the same way whatever the other rows hold.
        """
        predictor, tok = self.predictor()
        if self._trained is None:
            return {t.name: self.masks_for(t) for t in tasks}
        import torch

        from .train.data import encode

        rows, width = self.PREDICTOR_BATCH, self.PREDICTOR_BUCKET
        by_shape: dict[int, list[tuple[Task, list[int]]]] = {}
        for t in tasks:
            ids = encode(tok, t.instruction)
            if not ids:
                raise InstructionError(f"task {t.name!r}: the tokenizer produced no tokens for its instruction")
            by_shape.setdefault(-(-len(ids) // width) * width, []).append((t, ids))
        out = {}
        for n, items in sorted(by_shape.items()):
            for start in range(0, len(items), rows):
                group = items[start:start + rows]
                padded = torch.zeros(rows, n, dtype=torch.long)
                attention = torch.zeros(rows, n, dtype=torch.long)
                attention[:, 0] = 1  # unused rows: one token
                for i, (_, ids) in enumerate(group):
                    padded[i, :len(ids)] = torch.tensor(ids)
                    attention[i, :len(ids)] = 1
                with torch.no_grad():
                    masks = self._trained.batch_masks(padded, attention)
                for i, (t, _) in enumerate(group):
                    out[t.name] = [m[i].numpy().copy() for m in masks]
        return out

    def onnx(self):
        if self._onnx is None:
            import onnx_ir as ir

            if self.kind == "onnx":
                with status(f"loading {self.model}"):
                    self._onnx = ir.load(self.model)
            else:
                from .onnx import export_onnx_model

                ep, _, _ = self.programs()  # weights stay where they are until written
                self._onnx = export_onnx_model(ep, name="the base model")
        return self._onnx

    def gguf_path(self) -> str:
        """The GGUF file of a GGUF model (the default model's too)."""
        if self.kind == "default":
            from .real_model import GGUF_FILE, smollm2_dir

            return str(Path(smollm2_dir()) / GGUF_FILE)
        return self.model

    def widths(self) -> list[int]:
        if self.known_widths is not None:
            return self.known_widths
        if self.kind in ("gguf", "default") and self._ep is None:
            # the file's own FFN widths (the same blocks, in the same order, as the torch
            # program's): a GGUF-only build of mask tasks never loads the model
            from .gguf_task import GGUFError, gguf_widths

            try:
                return gguf_widths(self.gguf_path())
            except GGUFError:
                pass  # an architecture the gguf format does not cut: ask the torch program
        if self.kind == "onnx":
            from .onnx import find_onnx_ffn_blocks

            return [b.width for b in find_onnx_ffn_blocks(self.onnx())]
        from .passes import find_ffn_blocks

        return [b.width for b in find_ffn_blocks(self.programs()[0])]

    def masks_for(self, task: Task, data: bytes | None = None):
        if task.mask_file is not None:
            return read_mask_file(task.mask_file, self.widths(), data)
        predictor, tok = self.predictor()
        if self._trained is not None:
            return self.instruction_masks([task])[task.name]
        if predictor is None:
            raise InstructionError(f"task {task.name!r} has an instruction, but model {self.model} has no predictor "
                             "branch (give mask files, or a model ifp-compile can load with a predictor)")
        import torch

        from .masks import instruction_ids

        with torch.no_grad():
            return [m.numpy() for m in predictor(instruction_ids(task.instruction, tok))]


# --------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------
def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BuildError(f"output {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)


def _task_key(task: Task, base_hash: str, keep: float, formats: tuple[str, ...], dtype: str,
              gguf_down_type: str = "auto", max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
              mask_bytes: bytes | None = None, predictor: dict | None = None) -> dict:
    key = {"base_model_sha256": base_hash, "dtype": dtype, "formats": list(formats), "layout": LAYOUT,
           "tool_version": __version__}
    if "gguf" in formats:
        key["gguf_down_type"] = gguf_down_type
    if "pte" in formats:
        key["pte_max_cache_len"] = max_cache_len
    if task.instruction is not None:
        key.update(instruction=task.instruction, keep=keep, **(predictor or {"predictor": "prompt_activation"}))
    else:
        key.update(mask_file_sha256=hashlib.sha256(mask_bytes).hexdigest() if mask_bytes is not None else None)
    return key


def _up_to_date(task_dir: Path, key: dict) -> bool:
    try:
        return json.loads((task_dir / "manifest.json").read_text()).get("inputs") == key
    except (OSError, ValueError):
        return False


def _ensure_base(out: Path, source: Source, base_hash: str, formats: tuple[str, ...]) -> dict:
    """``DIR/base``: what no task changes, written once per base model hash and format.

    A later build that adds a format adds that part: the files already there are
    hard-linked into the new base directory, so task links into them stay valid.
    """
    dtype = source.dtype_name()
    base = out / "base"
    data: dict = {}
    if (base / "manifest.json").is_file():
        data = json.loads((base / "manifest.json").read_text())
        if (data.get("base_model_sha256") != base_hash or data.get("dtype") != dtype
                or data.get("layout") != LAYOUT or not all((base / f).is_file() for f in data.get("files", {}))):
            data = {}  # another model, dtype or layout: a new base (tasks keep theirs through their hard links)
            from .shared_graphs import GRAPHS

            shutil.rmtree(out / GRAPHS, ignore_errors=True)  # the old base's graphs and plans
    need_onnx = "onnx" in formats and SHARED_BIN not in data.get("files", {})
    need_pt2 = "pt2" in formats and BASE_SHARED not in data.get("files", {})
    need_tokenizer = "pte" in formats and TOKENIZER not in data.get("files", {})
    stat = model_stat(source.model)
    if not (need_onnx or need_pt2 or need_tokenizer or "widths" not in data):
        return data
    tmp = out / f"{BASE_TMP}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    data_before = data
    files = dict(data.get("files", {}))
    for name in files:
        link_or_copy(base / name, tmp / name)
    data = {"base_model_sha256": base_hash, "dtype": dtype, "layout": LAYOUT, "model": str(source.model),
            "tensors": data.get("tensors", {}), "files": files, "tool_version": __version__,
            "widths": data.get("widths") or source.widths(), "model_stat": stat}
    for key in ("pt2_ffn_parameters",):
        if key in data_before:
            data[key] = data_before[key]
    if need_onnx:
        from .onnx import find_onnx_ffn_blocks

        model = source.onnx()
        ffn = {p.name for block in find_onnx_ffn_blocks(model) for p in block.params}
        with status("writing the base weights (ONNX): shared, and the dense FFN weights tasks are sliced from"):
            data["tensors"] = write_base(model, tmp, ffn)
        files.update(file_hashes(tmp, ["model.onnx", *sorted({entry[0] for entry in data["tensors"].values()})]))
    if need_pt2:
        from .program_weights import ffn_parameter_names, parameters, write_parameters

        everything = parameters(source.programs()[0])
        ffn = ffn_parameter_names(source.programs()[0])
        files[BASE_SHARED] = write_parameters({k: t for k, t in everything.items() if k not in ffn}, tmp / BASE_SHARED,
                                              description="writing the base parameters every task shares (pt2)")
        files[BASE_FFN] = write_parameters({k: t for k, t in everything.items() if k in ffn}, tmp / BASE_FFN,
                                           description="writing the base's dense FFN parameters (pt2)")
        data["pt2_ffn_parameters"] = sorted(ffn)
    if need_tokenizer:
        files[TOKENIZER] = _write_tokenizer(source, tmp / TOKENIZER)
    data["files"] = dict(sorted(files.items()))
    atomic_write(tmp / "manifest.json", dump_json(data))
    replace_dir(tmp, base)
    return data


def _write_tokenizer(source: Source, path: Path) -> str:
    """The source's tokenizer as one ``tokenizer.json`` (what ExecuTorch's LLM runners read)."""
    tok = source._tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise BuildError(f"model {source.model}: the pte format ships a tokenizer.json beside each program, and this "
                         "model has no fast (tokenizers) tokenizer")
    data = backend.to_str().encode()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def _onnx_task(base_dir: str, base_table: dict, shared_sha256: str, masks, tmp: str) -> dict:
    """Specialise the base ONNX for one mask and write it into ``tmp`` (runs in workers too);
    what the manifest records, and under ``"plan"`` the plan later tasks of the same widths
    are written by (``shared_graphs``)."""
    from .onnx import initializer_count
    from .passes.onnx_specialize import specialize_onnx_with_slices
    from .shared_graphs import empty, onnx_plan

    empty(Path(tmp))  # a retried worker task starts again from nothing
    path = Path(base_dir) / "model.onnx"
    cache_key = (str(path), path.stat().st_mtime_ns)  # a rebuilt base is a new file
    base = _BASE_CACHE.get(cache_key)
    if base is None:
        _BASE_CACHE.clear()
        base = _BASE_CACHE[cache_key] = _load_base(path)
    small, slices = specialize_onnx_with_slices(base, [np.asarray(m, dtype=np.float32) for m in masks])
    scalars = initializer_count(small)
    info = write_task_onnx(small, Path(tmp), Path(base_dir), base_table, shared_sha256, external=frozenset(slices))
    info["onnx_initializer_scalars"] = scalars
    info["plan"] = onnx_plan(slices, info.pop("ffn_layout"), base, info)
    return info


_BASE_CACHE: dict = {}


def _load_base(path: Path):
    """The base ONNX model, each weight read from ``shared.bin`` or ``ffn.bin`` only when it is used.

    onnx_ir refuses to read external data from a file with several hard links (a guard
    against hard-link attacks); the shared weights have one link per task by design, and
    the file is ours, so it is read directly. Each initializer is a lazy tensor reading
    its byte range with a plain file read (no memory map: the pages of a mapping stay in
    the process's resident set, and a task of an 8B model touches gigabytes of them).
    """
    import onnx_ir as ir

    model = ir.load(str(path))
    for value in model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.ExternalTensor):
            if t.location not in (SHARED_BIN, FFN_BIN):
                raise ArtifactError(f"{path}: tensor {value.name} points at {t.location!r}, "
                                    f"not {SHARED_BIN} or {FFN_BIN}")
            value.const_value = ir.LazyTensor(_file_reader(path.parent / t.location, t), dtype=t.dtype,
                                              shape=t.shape, name=value.name)
    return model


def _file_reader(weights: Path, t):
    import onnx_ir as ir

    dtype, shape, offset = t.dtype.numpy(), tuple(t.shape.numpy()), t.offset
    count = t.length // dtype.itemsize

    def read():
        return ir.Tensor(np.fromfile(weights, dtype=dtype, count=count, offset=offset).reshape(shape), dtype=t.dtype)

    return read


@dataclass
class BuildReport:
    """What a build did. ``failed`` maps a task to the reason it was not built (the other
    tasks were built and kept); ``warnings`` are things the caller should know."""

    built: list[str]
    skipped: list[str]
    shared: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each built task, from its start to its publication


@dataclass
class _Options:
    formats: tuple[str, ...]
    jobs: int
    gguf_down_type: str
    max_cache_len: int
    gguf_type: str | None
    gguf_pre: str | None
    share_graphs: bool = True
    executor: str = "local"
    ray_address: str | None = None


def build(model: str, tasks_file, out, *, keep: float = 0.5, formats=("onnx",), jobs: int = 1,
          only: str | None = None, dtype=None, gguf_down_type: str = "auto",
          max_cache_len: int = DEFAULT_MAX_CACHE_LEN, gguf_type: str | None = None,
          gguf_pre: str | None = None, replace_base: bool = False, share_graphs: bool = True,
          executor: str = "local", ray_address: str | None = None, predictor: str | None = None) -> BuildReport:
    """Build every task of ``tasks_file`` (or the one named ``only``) into ``out``.

    ``dtype`` (float32, bfloat16, float16, or None for the model's own) is what the
    artifacts compute in; a Hugging Face directory is streamed, never loaded (``Source``).
    The ``gguf`` format (a GGUF model only) cuts each task's GGUF from the source file,
    quantized tensors kept quantized; ``gguf_down_type`` is what ``ffn_down`` is stored as
    (``gguf_task.write_task_gguf``); from a Hugging Face directory it is written tensor by
    tensor in ``gguf_type`` (``gguf_from_hf``). The ``pte`` format lowers each task's decode-step
    program (a static KV cache of ``max_cache_len`` positions) to ExecuTorch with XNNPACK.

    Each task is published (renamed into ``out/tasks/NAME``) as soon as it is complete, under
    its own lock, so a killed build keeps what it finished and the next build resumes, and
    many builds (one ``--only NAME`` per build-system target) can share ``out``
    (``build_locks``). A task that cannot be built (its mask file missing or of the wrong
    width, an instruction the model cannot read) is reported in ``BuildReport.failed`` and the
    others are built. ``out`` holds the tasks of one base model: a build of another model is
    refused unless ``replace_base`` (then every task is rebuilt for the new model).
    ``share_graphs=False`` builds every task with the graph passes instead of writing tasks
    of known widths from their plan (``shared_graphs``): the same bytes, slower; for
    comparisons. ``executor`` is where tasks that need no model in memory run: ``local``
    (``jobs`` worker processes) or ``ray`` (Ray tasks on the cluster at ``ray_address``, or on
    a local Ray instance); see ``executors``. ``predictor`` (a checkpoint directory of
    ``ifp-compile train``) picks instruction tasks' masks, in batches, instead of the
    prompt-activation predictor; its hash is one of their inputs, so they are rebuilt
    when it changes.
    """
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise BuildError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    if not 0 < keep <= 1:
        raise BuildError(f"--keep must be in (0, 1], got {keep}")
    if jobs < 1:
        raise BuildError(f"--jobs must be at least 1, got {jobs}")
    from .executors import EXECUTORS

    if executor not in EXECUTORS:
        raise BuildError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if ray_address is not None and executor != "ray":
        raise BuildError("--ray-address applies to --executor ray")
    if not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise BuildError(f"--max-cache-len must be an integer >= 2, got {max_cache_len!r}")
    tasks_path = Path(tasks_file)
    tasks = read_tasks(tasks_path)
    tasks_sha = sha256_file(tasks_path)
    if only is not None:
        tasks = [t for t in tasks if t.name == only]
        if not tasks:
            raise BuildError(f"--only {only}: no task of that name in {tasks_file}")
    out = Path(out)
    _prepare_out(out)
    source = Source(model, keep, dtype, predictor)
    predictor_key = None
    if predictor is not None:
        from .train.config import TrainError
        from .train.trainer import predictor_sha256

        try:
            predictor_key = {"predictor": "ifpredictor", "predictor_sha256": predictor_sha256(predictor)}
        except TrainError as e:
            raise BuildError(f"--predictor {predictor}: {e}") from None
    elif source.kind == "pt2":
        predictor_key = {"predictor": "program_branch"}  # the saved program's own predictor branch
    _check_format_options(source, model, formats, dtype, gguf_down_type, gguf_type, gguf_pre)
    opts = _Options(formats, jobs, gguf_down_type, max_cache_len, gguf_type, gguf_pre, share_graphs, executor,
                    ray_address)
    (out / "tasks").mkdir(exist_ok=True)
    existing, stat = _read_base_manifest(out), model_stat(model)
    base_hash = model_hash_cached(model, existing, stat)
    if existing.get("base_model_sha256") == base_hash and existing.get("model_stat") != stat:
        with shared_state_lock(out):  # touched, same bytes: remember, so the next build hashes nothing
            _remember_model_stat(out, stat, base_hash)
    if existing.get("base_model_sha256") not in (None, base_hash) and not replace_base:
        raise BuildError(f"{out} holds the tasks of another base model ({existing.get('model')}, sha256 "
                         f"{existing['base_model_sha256'][:12]}...), not of {model} (sha256 {base_hash[:12]}...): "
                         "build into another directory, or pass --replace-base to rebuild every task for this model")
    if (existing.get("base_model_sha256") == base_hash and existing.get("dtype") == source.dtype_name()
            and existing.get("layout") == LAYOUT and existing.get("widths")):
        source.known_widths = existing["widths"]  # mask tasks need no model load to be checked
    report = BuildReport(built=[], skipped=[], shared=[])
    mask_bytes: dict[str, bytes] = {}
    keys = {}
    for t in tasks:
        if t.mask_file is not None:
            try:
                mask_bytes[t.name] = read_mask_bytes(t.mask_file)
            except MaskError as e:
                report.failed[t.name] = str(e)
                continue
        keys[t.name] = _task_key(t, base_hash, keep, formats, source.dtype_name(), gguf_down_type, max_cache_len,
                                 mask_bytes.get(t.name), predictor_key)
        if "gguf" in formats and source.kind == "hf":
            keys[t.name].update(gguf_type=gguf_type, gguf_pre=gguf_pre)
            keys[t.name].pop("gguf_down_type", None)
    todo = [t for t in tasks if t.name in keys and not _up_to_date(out / "tasks" / t.name, keys[t.name])]
    report.skipped = [t.name for t in tasks if t.name in keys and t not in todo]
    if todo:
        masks = _compute_masks(source, todo, mask_bytes, opts, report)
        ready = [t for t in todo if t.name in masks]
        if ready:
            if "pte" in formats:
                source.decode_step(max_cache_len)  # the model's kind and dtype checked before anything is written
            try:
                with shared_state_lock(out):
                    remove_stale_leftovers(out)
                    base = _ensure_base(out, source, base_hash, formats)
                _build_tasks(out, source, base, ready, keys, masks, opts, report)
            except OSError as e:  # a full disk, permissions: no partial task stays behind
                with shared_state_lock(out):
                    remove_stale_leftovers(out)
                    _write_index(out)
                where = e.filename or out
                kept = f" ({len(report.built)} finished task(s) kept)" if report.built else ""
                raise BuildError(f"writing {where} failed: {e.strerror or e}; no partial task was left in "
                                 f"{out}{kept}") from None
    if only is None or not (out / "index.json").is_file():
        # the full rescan; an --only build's task was added as it was published (_index_add),
        # and rescanning every manifest per --only call would cost O(tasks) per target
        with shared_state_lock(out):
            _write_index(out)
    if tasks_path.is_file() and sha256_file(tasks_path) != tasks_sha:
        report.warnings.append(f"{tasks_path} changed during the build: the tasks built are those it held when the "
                               "build started; build again to apply the change")
    return report


def _check_format_options(source, model, formats, dtype, gguf_down_type, gguf_type, gguf_pre) -> None:
    if source.kind == "onnx" and "pt2" in formats:
        raise BuildError(f"model {model} is ONNX: the pt2 format needs a torch model")
    if "gguf" not in formats:
        return
    from .gguf_from_hf import QTYPES
    from .gguf_task import DOWN_TYPES

    if source.kind == "hf":
        if gguf_type not in QTYPES:
            raise BuildError(f"model {model} is a Hugging Face checkpoint: --format gguf needs --gguf-type, the "
                             f"type its weights are written in ({', '.join(QTYPES)}); got {gguf_type!r}")
    elif source.kind in ("gguf", "default"):
        if gguf_type is not None or gguf_pre is not None:
            raise BuildError(f"model {model} is a GGUF file: its tasks keep its tensor types and tokenizer "
                             "(--gguf-type and --gguf-pre apply to Hugging Face checkpoints; see --gguf-down-type)")
        if dtype is not None:
            raise BuildError("--dtype does not apply to the gguf format: a task's GGUF keeps the source's tensor "
                             "types (see --gguf-down-type for ffn_down)")
    else:
        raise BuildError(f"model {model}: the gguf format is written from a GGUF file or a Hugging Face checkpoint "
                         f"directory (config and tokenizer included), not from a .{source.kind} file")
    if gguf_down_type not in DOWN_TYPES:
        raise BuildError(f"--gguf-down-type {gguf_down_type!r}: choose from {', '.join(DOWN_TYPES)}")


def _compute_masks(source, todo, mask_bytes, opts: _Options, report: BuildReport) -> dict:
    """Every task's masks, checked against what its formats can hold, before anything is
    written; a task whose masks fail goes to ``report.failed`` with the reason."""
    from .gguf_task import GGUFError

    masks = {}
    batched: dict = {}
    instructed = [t for t in todo if t.instruction is not None]
    if instructed and source.predictor_checkpoint is not None:
        try:  # a trained predictor reads its instructions in batches
            with status(f"computing the masks of {len(instructed)} instruction task(s) with the trained predictor"):
                batched = source.instruction_masks(instructed)
        except InstructionError:
            pass  # an instruction it cannot read: one task at a time below, that one failing alone
    for t in progress(todo, "computing masks"):
        try:
            m = batched[t.name] if t.name in batched else source.masks_for(t, mask_bytes.get(t.name))
            if "gguf" in opts.formats and source.kind != "hf":
                from .gguf_task import check_masks

                check_masks(source.gguf_path(), m, opts.gguf_down_type)
        except (MaskError, GGUFError, InstructionError) as e:  # this task's inputs; the model's errors stop the build
            report.failed[t.name] = str(e)
            continue
        masks[t.name] = m
    if "gguf" in opts.formats and source.kind == "hf" and masks:
        from .gguf_from_hf import check_hf_masks, check_hf_source

        try:  # the checkpoint's architecture and tokenizer: every task's, so the build stops
            check_hf_source(source.model, [], qtype=opts.gguf_type, pre=opts.gguf_pre)
        except GGUFError as e:
            raise BuildError(str(e)) from None
        for name in list(masks):  # then each task's widths
            try:
                check_hf_masks(source.model, masks[name])
            except GGUFError as e:
                report.failed[name] = str(e)
                del masks[name]
    return masks


def _build_tasks(out, source, base, todo, keys, masks, opts: _Options, report: BuildReport) -> None:
    """Build and publish ``todo`` one task at a time, each under its lock.

    Tasks whose lock another build holds are built last, after waiting for it (usually
    they are then up to date). A task with the masks of one already published in this
    build hard-links its files. The first task of each signature (channels kept per block)
    is built by the graph passes, which store its graph and plan; every later one of that
    signature is written from the plan (``shared_graphs``), in the executor's workers when
    there are any (``--jobs``, ``--executor``). At most ``jobs`` tasks are in flight, so
    temporary disk stays bounded by them.
    """
    from concurrent.futures import Future

    from .shared_graphs import PLANNED, PlanError, forget, load_plans, signature, write_from_plans

    digests = {name: mask_digest(m) for name, m in masks.items()}
    published: dict[str, str] = {}  # mask digest -> a task of this build that holds its files
    earlier = _published_index(out)  # tasks of earlier builds, whose files a twin may link
    infos: dict[str, dict] = {}
    bar = progress_bar(len(todo), "building tasks")
    planned = [f for f in opts.formats if f in PLANNED] if opts.share_graphs else []
    pool = None
    if opts.executor != "local" or (len(todo) > 1 and planned and opts.jobs > 1):
        from .executors import ExecutorError, make_executor

        try:
            pool = make_executor(opts.executor, opts.jobs, opts.ray_address)
        except ExecutorError as e:
            raise BuildError(str(e)) from None
    window = getattr(pool, "window", opts.jobs)  # tasks in flight
    in_flight: list = []
    started: dict[str, float] = {}

    def submit(fn, *args):
        if pool is not None:
            return pool.submit(fn, *args)
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:
            future.set_exception(e)
        return future

    def finish(entry) -> None:
        t, lock, tmp, future, written = entry
        try:
            info = None
            if future is not None:
                try:
                    info = future.result()
                except PlanError:  # a stored graph changed or vanished: the passes build this task
                    for fmt in written:
                        forget(out, base, fmt, masks[t.name])
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir()
                    info, written = None, ()
            info = _assemble(out, source, base, t, tmp, masks[t.name], opts, info, written)
            infos[t.name] = info
            _publish(out, t, tmp, keys[t.name], digests[t.name], masks[t.name], info, base)
            published.setdefault(digests[t.name], t.name)
            report.built.append(t.name)
            report.seconds[t.name] = time.perf_counter() - started[t.name]
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as e:  # this task fails with its reason; the others are built
            shutil.rmtree(tmp, ignore_errors=True)
            report.failed[t.name] = _reason(e)
        finally:
            lock.release()
            bar.update(1)

    def start(t, lock) -> None:
        if _up_to_date(out / "tasks" / t.name, keys[t.name]):  # published by another build meanwhile
            lock.release()
            report.skipped.append(t.name)
            bar.update(1)
            return
        started[t.name] = time.perf_counter()
        tmp = task_tmp(out, t.name)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        owner = published.get(digests[t.name])
        owner_lock = None
        if owner is None:  # a task of an earlier build with the same masks and inputs
            owner, owner_lock, info = _earlier_twin(out, earlier, t.name, digests[t.name], keys[t.name])
            if owner is not None:
                infos[owner] = info
        if owner is not None:  # identical masks: hard-link the published task's files
            try:
                for f in sorted((out / "tasks" / owner).iterdir()):
                    if f.name != "manifest.json":
                        link_or_copy(f, tmp / f.name)
                _publish(out, t, tmp, keys[t.name], digests[t.name], masks[t.name], infos[owner], base)
                report.built.append(t.name)
                report.shared.append(t.name)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                lock.release()
                if owner_lock is not None:
                    owner_lock.release()
                bar.update(1)
            return
        future, written = None, ()
        plans = load_plans(out, base, planned, masks[t.name]) if planned else None
        if plans is not None:  # a task of known widths: its weights by the plan, anywhere
            future, written = submit(write_from_plans, str(out), base, plans, masks[t.name], str(tmp)), tuple(plans)
        elif pool is not None and "onnx" in opts.formats:
            future, written = pool.submit(_onnx_task, str(out / "base"), base["tensors"], base["files"][SHARED_BIN],
                                          masks[t.name], str(tmp)), ("onnx",)
        in_flight.append((t, lock, tmp, future, written))
        while len(in_flight) >= window or (in_flight and pool is None):
            finish(in_flight.pop(0))

    def drain() -> None:
        while in_flight:
            finish(in_flight.pop(0))

    try:
        # the first task of each signature first (its graph and plan are what the others
        # are written from), then the first of each mask, then the rest (they link its files)
        seen, shapes = set(), set()
        groups: tuple[list, list, list] = ([], [], [])
        for t in todo:
            sig = json.dumps(signature(masks[t.name]))
            group = 2 if digests[t.name] in seen else 1 if sig in shapes else 0
            groups[group].append(t)
            seen.add(digests[t.name])
            shapes.add(sig)
        deferred = []
        for group in groups:
            for t in group:
                lock = TaskLock(out, t.name)
                if lock.try_acquire():
                    start(t, lock)
                else:
                    deferred.append(t)
            drain()
        for t in deferred:  # another build holds them: wait, then they are usually up to date
            lock = TaskLock(out, t.name)
            lock.acquire()
            start(t, lock)
        drain()
    except BaseException:
        for t, lock, tmp, *_ in in_flight:
            shutil.rmtree(tmp, ignore_errors=True)
            lock.release()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()


#: a task's inputs that name what it is, not what its files hold
_IDENTITY = ("instruction", "keep", "predictor", "predictor_sha256", "mask_file_sha256")


def _published_index(out: Path) -> dict:
    """The tasks ``index.json`` lists (read once per build: tasks this build publishes are
    in its own ``published`` map)."""
    try:
        return json.loads((out / "index.json").read_text())["tasks"]
    except (OSError, ValueError, KeyError):
        return {}


def _earlier_twin(out: Path, index: dict, name: str, digest: str, key: dict):
    """A task published by an earlier build whose files this one's would equal (same masks,
    same inputs but its identity), locked so that nobody replaces it while it is linked;
    ``(name, lock, info for the manifest)`` or ``(None, None, None)``. Found through
    ``index``, so a build of one task reads one more manifest, not thousands."""
    want = {k: v for k, v in key.items() if k not in _IDENTITY}
    for other, entry in sorted(index.items()):
        if other == name or entry.get("mask_sha256") != digest:
            continue
        lock = TaskLock(out, other)
        if not lock.try_acquire():
            continue
        try:
            m = json.loads((out / "tasks" / other / "manifest.json").read_text())
        except (OSError, ValueError):
            m = {}
        if m.get("mask_sha256") == digest and {k: v for k, v in m.get("inputs", {}).items() if k not in _IDENTITY} == want:
            info = {**m["parameters"], "files": m["files"], **{k: m[k] for k in (
                "own_weight_bytes", "base_linked", "pt2_own_weight_bytes", "pt2_base_linked", "gguf_ffn_down_types",
                "gguf_notes", "gguf_tensor_types", "pte") if k in m}}
            return other, lock, info
        lock.release()
    return None, None, None


def _reason(e: Exception) -> str:
    """A task's failure as one line for the summary: the message of our own errors, the
    type and message of anything else."""
    return str(e) if isinstance(e, IFPError) else f"{type(e).__name__}: {e}"


def _assemble(out, source, base, t: Task, tmp: Path, masks, opts: _Options, info: dict | None,
              written=()) -> dict:
    """Write task ``t``'s files into ``tmp`` in every format but those ``written`` already
    (``info`` holds what they record); returns what its manifest records. A format built
    by the graph passes here stores its graph and plan for the next task of its widths."""
    from .shared_graphs import pt2_plan, store

    formats = opts.formats
    if "onnx" in formats and "onnx" not in written:
        info = _onnx_task(str(out / "base"), base["tensors"], base["files"][SHARED_BIN], masks, str(tmp))
    info = dict(info or {})
    _write_mask(tmp, masks)  # after the ONNX step, which starts from an empty directory
    plan = info.pop("plan", None)
    if plan is not None:
        store(out, base, "onnx", masks, tmp, plan)
    as_tensors = None
    if ("pt2" in formats and "pt2" not in written) or "pte" in formats:
        import torch

        as_tensors = [torch.from_numpy(np.asarray(m)) for m in masks]
    if "pt2" in formats and "pt2" not in written:
        from .passes.specialize import specialize_with_slices
        from .program_weights import own_parameters

        ep = source.programs()[0]
        small, slices = specialize_with_slices(ep, as_tensors)
        ffn = base["pt2_ffn_parameters"]
        own = own_parameters(small, ep, not_shared=ffn)
        pt2 = write_task_pt2(small, ep, tmp, out / "base", base["files"][BASE_SHARED], ffn, own=own)
        pt2["pt2_parameters"] = _count(small)
        info.setdefault("files", {}).update(pt2.pop("files"))
        info.update(pt2)
        plan = pt2_plan(own, slices, set(ffn), info)
        if plan is not None:
            store(out, base, "pt2", masks, tmp, plan)
    if "gguf" in formats and source.kind == "hf":
        from .gguf_from_hf import write_hf_task_gguf

        g = write_hf_task_gguf(source.model, masks, tmp / TASK_GGUF, qtype=opts.gguf_type, pre=opts.gguf_pre,
                               task=t.name)
        info.update(gguf_tensor_types=dict(sorted(g.tensor_types.items())), gguf_notes=g.notes)
    elif "gguf" in formats:
        from .gguf_task import write_task_gguf

        g = write_task_gguf(source.gguf_path(), masks, tmp / TASK_GGUF, down_type=opts.gguf_down_type, task=t.name)
        info.update(gguf_ffn_down_types=sorted(set(g.down_types)), gguf_notes=g.notes)
    if "pte" in formats:
        from .passes import specialize
        from .pte import write_pte

        small = specialize(source.decode_step(opts.max_cache_len), mask=as_tensors)
        sha = write_pte(small, tmp / TASK_PTE)
        link_or_copy(out / "base" / TOKENIZER, tmp / TOKENIZER)
        tok = source._tokenizer
        info.setdefault("files", {}).update({TASK_PTE: sha, TOKENIZER: base["files"][TOKENIZER]})
        info.update(pte_parameters=_count(small), pte={
            "max_cache_len": opts.max_cache_len, "dtype": source.dtype_name(), "backend": "xnnpack",
            "method": "forward", "inputs": ["input_ids: int64 [1, n], 1 <= n <= max_cache_len",
                                            "cache_position: int64 [n], the positions of input_ids"],
            "output": "logits [1, n, vocab]", "tokenizer": TOKENIZER,
            "bos_token_id": getattr(tok, "bos_token_id", None), "eos_token_id": getattr(tok, "eos_token_id", None)})
    return info


def _publish(out: Path, t: Task, tmp: Path, key: dict, digest: str, masks, info: dict, base: dict) -> None:
    """The manifest last, then one rename: ``out/tasks/NAME`` is the whole task or the old one."""
    _write_manifest(tmp, t, key, digest, masks, info, base)
    replace_dir(tmp, out / "tasks" / t.name)
    _index_add(out, t.name)


def _write_mask(directory: Path, masks) -> None:
    """The task's mask beside its weights (``ffn.<i>``, the format ``--mask`` files use):
    what ``ifp-compile report`` reads to draw per-layer widths and mask overlaps."""
    from safetensors.numpy import save

    atomic_write(directory / MASK_FILE, save({f"ffn.{i}": np.asarray(m, dtype=np.float32) for i, m in enumerate(masks)}))


def _count(ep) -> int:
    from .stats import count_parameters

    return count_parameters(ep)


def _write_manifest(tmp: Path, task: Task, key: dict, digest: str, masks, info: dict, base: dict) -> None:
    files = sorted(p.name for p in tmp.iterdir() if p.name != "manifest.json")
    known = info.get("files", {})  # hashed by the worker while writing (hard links: same bytes)
    manifest = {
        "name": task.name,
        "inputs": key,
        "instruction": task.instruction,
        "mask_sha256": digest,
        "kept_channels": [int(np.count_nonzero(m)) for m in masks],
        "widths": [int(np.asarray(m).shape[0]) for m in masks],
        "parameters": {k: v for k, v in info.items() if k.endswith(("parameters", "scalars"))},
        "own_weight_bytes": info.get("own_weight_bytes"),
        "base_linked": info.get("base_linked"),
        "formats": key["formats"],
        "files": {n: known.get(n) or sha256_file(tmp / n) for n in files},
        "tool_version": __version__,
    }
    manifest.update({k: info[k] for k in ("pt2_own_weight_bytes", "pt2_base_linked", "gguf_ffn_down_types",
                                          "gguf_notes", "gguf_tensor_types", "pte") if k in info})
    atomic_write(tmp / "manifest.json", dump_json(manifest))


def _index_entry(name: str, m: dict) -> dict:
    return {"path": f"tasks/{name}", "mask_sha256": m["mask_sha256"], "kept_channels": sum(m["kept_channels"]),
            "parameters": m["parameters"], "instruction": m["instruction"]}


def _write_index(out: Path) -> None:
    """``index.json`` from every published task (the end of a build: authoritative)."""
    tasks = {}
    for d in sorted((out / "tasks").iterdir()):
        # not the .old-* a replacement killed half-way leaves (task names never start with ".")
        if d.is_dir() and not d.name.startswith(".") and (d / "manifest.json").is_file():
            tasks[d.name] = _index_entry(d.name, json.loads((d / "manifest.json").read_text()))
    atomic_write(out / "index.json", dump_json({"tool_version": __version__, "tasks": tasks}))


def _index_add(out: Path, name: str) -> None:
    """Add one just-published task to ``index.json``: a build killed later still leaves an
    index of what it finished, and later tasks with the same masks find it to link.

    A kill between a task's rename and this update leaves that one task published but not
    listed; the next publication in the directory (any build, ``--only`` too) adds every
    such task (one directory listing, manifests read only for those), so the index heals
    without a full rescan."""
    with shared_state_lock(out):
        try:
            index = json.loads((out / "index.json").read_text())
        except (OSError, ValueError):
            index = {"tool_version": __version__, "tasks": {}}
        tasks = index.get("tasks", {})
        tasks[name] = _index_entry(name, json.loads((out / "tasks" / name / "manifest.json").read_text()))
        for d in (out / "tasks").iterdir():  # published by a build killed before it listed them
            if d.name not in tasks and not d.name.startswith(".") and (d / "manifest.json").is_file():
                try:
                    tasks[d.name] = _index_entry(d.name, json.loads((d / "manifest.json").read_text()))
                except (OSError, ValueError, KeyError):
                    pass  # not a task of ours: verify names it
        index.update(tool_version=__version__, tasks=dict(sorted(tasks.items())))
        atomic_write(out / "index.json", dump_json(index))


def verify(out) -> list[str]:
    """Check every task of a build directory (and the base), or one task directory (an
    ``export-task`` copy); returns the task names."""
    out = Path(out)
    if not (out / "index.json").is_file() and (out / "manifest.json").is_file():
        return [verify_artifact(out)["name"]]
    if not (out / "index.json").is_file():
        raise ArtifactError(f"{out}: not an ifp-compile build directory (no index.json) nor a task directory "
                            "(no manifest.json)")
    cache: dict = {}
    base = out / "base"
    if base.exists():
        verify_artifact(base, cache=cache)
    names = sorted(json.loads((out / "index.json").read_text())["tasks"])
    for name in progress(names, "verifying tasks"):
        verify_artifact(out / "tasks" / name, cache=cache)
    return names


def inspect_rows(out) -> list[dict]:
    out = Path(out)
    if not (out / "index.json").is_file():
        raise ArtifactError(f"{out}: not an ifp-compile build directory (no index.json)")
    rows = []
    for name in sorted(json.loads((out / "index.json").read_text())["tasks"]):
        d = out / "tasks" / name
        m = json.loads((d / "manifest.json").read_text())
        own = sum((d / f).stat().st_size for f in m["files"] if f not in SHARED_FILES)
        kept, total = sum(m["kept_channels"]), sum(m["widths"])
        params = (m["parameters"].get("pt2_parameters") or m["parameters"].get("pte_parameters")
                  or m["parameters"].get("onnx_initializer_scalars"))
        rows.append({"task": name, "kept": f"{kept}/{total} ({100 * kept / total:.1f}%)", "parameters": params,
                     "own_bytes": own, "formats": ",".join(m["formats"]), "instruction": m["instruction"] or "(mask)"})
    return rows
