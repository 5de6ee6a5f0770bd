"""The one way a kept slice of a weight is computed, in RAM or streamed from a checkpoint.

``specialize`` (in RAM), the streaming writers (``weights``) and ``specialize_onnx`` all
produce a sliced weight with this function, so an artifact streamed from a checkpoint is
bit for bit the tensor the in-RAM pass computes.

Precision: a soft mask value ``m_c`` is folded into its column of ``W_down`` in float32
and rounded once to the weight's dtype, ``round_D(float32(W[:, c]) * m_c)`` (in float64
for float64 weights). The product of a bf16/fp16 weight and a float32 scale is exact in
float32 only up to one rounding, so this is the most accurate fold a dtype-D weight can
hold; docs/architecture.md ("Precision") derives the bound it gives against the masked
reference.
"""

from __future__ import annotations

import torch


def take(tensor: torch.Tensor, axis: int, index: torch.Tensor, scale: torch.Tensor | None = None, *,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor.index_select(axis, index)``, each kept position multiplied by ``scale``.

    ``scale`` (one value per entry of ``index``) is folded as the module docstring says;
    ``None`` means every kept value is 1 and no arithmetic is done at all. A weightless
    (meta) tensor is not computed: the slice is recorded in its recipe (``weights.lazy``)
    and done, by this same function, when the values are read.
    """
    if tensor.device.type == "meta":
        from .weights.lazy import derive

        return derive(tensor, axis, index, scale)
    if out is None:  # ``out``: memory to write the slice into (a streaming writer reuses buffers)
        out = tensor.index_select(axis, index)
    else:
        torch.index_select(tensor, axis, index, out=out)
    if scale is None:
        return out
    shape = [1] * out.dim()
    shape[axis] = -1
    if out.dtype in (torch.float32, torch.float64):
        return out.mul_(scale.to(out.dtype).view(shape))
    return out.copy_((out.float() * scale.to(torch.float32).view(shape)).to(out.dtype))


def take_array(array, axis: int, index, scale=None):
    """:func:`take` on a numpy array (ONNX initializers; bfloat16 as ``ml_dtypes``).

    The same arithmetic in numpy: selection is exact, the fold is a float32 (float64)
    product rounded once (round-to-nearest-even, as torch), so both give the same bits.
    """
    import numpy as np

    out = np.take(array, np.asarray(index), axis=axis)
    if scale is None:
        return np.ascontiguousarray(out)
    shape = [1] * out.ndim
    shape[axis] = -1
    compute = np.float64 if out.dtype == np.float64 else np.float32
    folded = out.astype(compute) * np.asarray(scale, dtype=compute).reshape(shape)
    return np.ascontiguousarray(folded.astype(out.dtype))


def kept_channels(mask):
    """A mask's kept channels (its non-zero entries, as indices) and the values :func:`take`
    folds into ``W_down``: None when every kept value is 1 (a binary mask folds nothing).

    The ONNX pass and tasks written from a plan (``shared_graphs``) both cut by it, so they
    agree on what is kept and what is scaled.
    """
    import numpy as np

    m = np.asarray(mask, dtype=np.float32)
    keep = np.flatnonzero(m)
    scale = m[keep]
    return keep, (None if bool(np.all(scale == 1)) else scale)

