"""The floating dtypes a model can be compiled in, and their spellings on the command line."""

from __future__ import annotations

import torch

from .errors import IFPError

#: what ``--dtype`` accepts -> the torch dtype
SPELLINGS = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
}
SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def parse_dtype(value) -> torch.dtype:
    """A supported compute dtype from a torch dtype or a name (``bf16``, ``float16``...).

    Models compute in float32, bfloat16 or float16; anything else (integer, float8,
    float64) is refused with the list of what is accepted.
    """
    if isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.lower().removeprefix("torch.") in SPELLINGS:
        dtype = SPELLINGS[value.lower().removeprefix("torch.")]
    else:
        raise IFPError(f"dtype {value!r} is not one a model can be compiled in: choose float32, bfloat16 or float16 "
                       "(fp32, bf16, fp16)")
    if dtype not in SUPPORTED:
        raise IFPError(f"dtype {dtype} is not one a model can be compiled in: choose float32, bfloat16 or float16")
    return dtype


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
