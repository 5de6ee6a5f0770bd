"""float32 master copies of the half-precision parameters a run trains.

Why: AdamW stepping float16 weights directly breaks at the second step. Its second moment
``v`` (0.001 * grad**2) underflows to 0 in float16 and its ``eps`` (1e-8) rounds to 0, so the
update is ``m / 0``. On bfloat16 weights nothing overflows, but an update smaller than about
1/256 of the weight is rounded away: at ``llm_lr`` 1e-5 most of a joint run's LLM updates
would be lost. So the optimizer steps float32 copies, and the model gets them rounded to its
own precision after every step (the forward and backward stay in the model's precision).

Checkpoints store the float32 copies, so a resumed run continues exactly; loading one into a
half-precision model for evaluation rounds it once, as the live model was.
"""
from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)


class MasterWeights:
    """The float32 stand-ins of every half-precision tensor in ``params``; others pass through."""

    def __init__(self, params) -> None:
        self._master: dict[int, torch.Tensor] = {}
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p in params:
            if p.dtype in HALF and id(p) not in self._master:
                m = p.detach().to(torch.float32).clone()
                self._master[id(p)] = m
                self._pairs.append((p, m))

    def stand_in(self, p: torch.Tensor) -> torch.Tensor:
        """What the optimizer steps for ``p``: its float32 copy, or ``p`` itself."""
        return self._master.get(id(p), p)

    def swap(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` with every half tensor replaced by its float32 copy (to save or load)."""
        return {name: self.stand_in(p) for name, p in params.items()}

    def grads_to_master(self) -> None:
        """After backward: the model's half gradients, widened, become the copies' gradients.

        The model's own are dropped: the optimizer's ``zero_grad`` only reaches the copies, so
        left in place they would add up over the steps."""
        for p, m in self._pairs:
            m.grad = None if p.grad is None else p.grad.detach().to(torch.float32)
            p.grad = None

    @torch.no_grad()
    def to_model(self) -> None:
        """After the optimizer step (or a load): round the copies into the model."""
        for p, m in self._pairs:
            p.copy_(m)
