"""Where each row's masks come from: the question is whether a mask chosen *per task*
beats one static model of the same size, so every masked row keeps the same number of
FFN channels in total.

* ``static``: one mask for everything. Adapt-Pruner (``ifp_compile.adapt``: per-layer
  budgets from layer importance, within-layer scores) over mixed calibration text from the
  training side of all domains, or uniform magnitude pruning (``static="magnitude"``);
* ``prompt-activation``: GRIFFIN's rule on the prompt's own FFN activations, per input;
* ``ifpredictor``: a trained IFPredictor checkpoint on the prompt, per input;
* ``random``: a random channel set per input with the per-task rows' counts (the floor);
* the trained equal-budget controls (``controls``): a static learned mask, the static
  calibrated set with learned scales, a per-task and a per-input predictor, each with the
  LLM frozen or trained jointly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import IFPError

MaskFn = Callable[[torch.Tensor], list[torch.Tensor]]


@dataclass
class MaskSource:
    name: str
    kind: str  # "static", "prompt-activation", "ifpredictor", "random"
    masks_for: MaskFn  # prompt ids [1, T] -> one mask per FFN block
    per_task: bool
    #: the model (and its exported program) this row runs; None = the evaluated model.
    #: A checkpoint that trained the LLM jointly with its predictor brings its own weights.
    model: object = None
    program: object = None
    #: what ``masks_for`` is given: the segment's "prompt" (its first tokens), its domain's
    #: "instruction" (``corpora.INSTRUCTIONS``) or a "constant" input (a static learned mask)
    reads: str = "prompt"


def static_source(program, calibration: list[torch.Tensor], keep: float, method: str = "adapt",
                  score: str = "taylor", progress=None) -> MaskSource:
    from ..adapt import adapt_prune, channel_scores, uniform_masks

    if method == "adapt":
        masks = adapt_prune(program, calibration, 1.0 - keep, method=score, progress=progress).ffn_masks
        name = f"static: Adapt-Pruner ({score})"
    elif method == "magnitude":
        with torch.no_grad():
            masks = uniform_masks(channel_scores(program), 1.0 - keep)
        name = "static: uniform magnitude"
    else:
        raise IFPError(f"static mask method must be 'adapt' or 'magnitude', got {method!r}")
    return MaskSource(name, "static", lambda ids: masks, per_task=False)


def prompt_activation_source(program, counts: list[int]) -> MaskSource:
    from ..predictors import PromptActivationPredictor

    probe = PromptActivationPredictor(program, keep=counts)
    return MaskSource("per-task: prompt activation (GRIFFIN)", "prompt-activation",
                      lambda ids: [m.detach() for m in probe(ids)], per_task=True)


def ifpredictor_source(predictor, trained_llm: bool, model=None, program=None) -> MaskSource:
    predictor.eval()

    def masks_for(ids):
        with torch.no_grad():
            return [m.detach() for m in predictor(ids)]

    suffix = ", LLM trained with it" if trained_llm else ""
    return MaskSource(f"per-task: IFPredictor{suffix}", "ifpredictor", masks_for, per_task=True,
                      model=model if trained_llm else None, program=program if trained_llm else None)


def random_source(widths: list[int], counts: list[int], seed: int = 0) -> MaskSource:
    g = torch.Generator().manual_seed(seed)

    def masks_for(ids):
        return [torch.zeros(w).index_fill(0, torch.randperm(w, generator=g)[:k], 1.0) for w, k in zip(widths, counts)]

    return MaskSource("random mask", "random", masks_for, per_task=True)

