"""Scratch memory reused from one streamed tensor to the next.

Why: on these machines the cost of streaming weights is not the copy but the first touch
of fresh memory. Every new buffer is paged in on first write, one page fault per 4 KB
(measured on the 1B model's FFN weights: reading and slicing them into fresh tensors takes
2.5 s, into reused buffers 1.0 s). A writer materializes one tensor after another, each
used once, so the same few buffers can serve them all: a read buffer for the source
tensor, one for its kept slice, alternating with the tensor being written meanwhile.

Buffers larger than ``limit`` (an embedding table) are not kept: they are few, and keeping
them would double the peak memory a model's largest tensor costs.
"""

from __future__ import annotations

import threading

import torch


class BufferPool:
    """``get(nbytes)`` a uint8 buffer, ``release(tensor)`` it after use (any view of it)."""

    def __init__(self, limit: int = 768 * 2**20):
        self.limit = limit
        self._free: list[torch.Tensor] = []
        self._used: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
            else:
                buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self._used[buf.data_ptr()] = buf
            return buf[:nbytes]

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape``/``dtype`` in a pooled buffer."""
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return self.get(nbytes).view(dtype).reshape(shape)

    def release(self, t: torch.Tensor) -> None:
        """Give back the buffer ``t`` lives in (a no-op for memory the pool did not hand out)."""
        if t.device.type != "cpu":
            return
        key = t.untyped_storage().data_ptr()
        with self._lock:
            buf = self._used.pop(key, None)
            if buf is None:
                return
            kept = sum(b.numel() for b in self._free)
            if buf.numel() <= self.limit and kept + buf.numel() <= 2 * self.limit:
                self._free.append(buf)
