"""Training-free mask predictor: GRIFFIN's rule on the prompt's FFN activations.

During the instruction's forward pass, take each token's FFN intermediate activation
``h_t`` (the input of the down projection), normalise it to unit L2 norm, take each
channel's L2 norm over the tokens, and keep the top-k channels per block:

    s_c = || (h_t[c] / ||h_t||)_t ||_2 ,   m = 1[c in TopK(s, k)]

The activations come from a *probe*: the model's own exported graph with every
block's ``h`` (found by :func:`find_ffn_blocks`) as outputs and the LM head cut off.
No forward hooks, no module names: it works for every model discovery understands.

The program may be a logits program (``input_ids -> logits``) or a decode-step program
(``(input_ids, cache_position) -> logits``, a KV cache inside, ``export_decode_step``):
the instruction is read as a prefill from position 0, which computes the same
activations, so a caller that decodes with a decode step need not export a second program
for the predictor (the demo saves 9-15 s this way). The probe keeps its own copy of the cache.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import ExportedProgram

from ..capture import export, is_hf_causal_lm
from ..decode_step import _cache_placeholders, _own_state, max_cache_len
from ..errors import InstructionError, ProgramError
from ..passes.discover_ffn import find_ffn_blocks
from ..passes.program_edit import probe_module
from ..weights import stream
from .base import MaskPredictor, keep_counts


def _has_dynamic_seq(ep: ExportedProgram) -> bool:
    from ..graph_utils import user_input_nodes

    users = user_input_nodes(ep)
    return bool(users) and any(not isinstance(s, int) for s in users[0].meta["val"].shape)


def activation_probe(ep: ExportedProgram) -> tuple[torch.fx.GraphModule, list[int]]:
    """``ep.module()`` rewired to return every FFN block's intermediate activation."""
    blocks = find_ffn_blocks(ep)
    gm = probe_module(ep, [b.hidden_node for b in blocks])
    return gm, [b.width for b in blocks]


class PromptActivationPredictor(MaskPredictor):
    """Binary masks from the instruction's own FFN activations (GRIFFIN).

    ``model`` is a Hugging Face causal LM (exported here with a dynamic sequence
    length) or an ExportedProgram whose first input has a dynamic sequence dim: a logits
    program, or a decode-step program with prompt chunks (``export_decode_step``).
    ``keep`` is a ratio in (0, 1] or one channel count per block.
    """

    def __init__(self, model: nn.Module | ExportedProgram, keep=0.5, *, eps: float = 1e-6):
        super().__init__()
        if isinstance(model, ExportedProgram):
            ep = model
        elif isinstance(model, nn.Module):
            if not is_hf_causal_lm(model):
                raise ProgramError(
                    "PromptActivationPredictor needs a causal LM reading token ids: a Hugging Face "
                    "model, or an ExportedProgram of one with a dynamic sequence dim"
                )
            ep = export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
        else:
            raise ProgramError(f"PromptActivationPredictor(model=...): got {type(model).__name__}")
        if not _has_dynamic_seq(ep):
            raise ProgramError(
                "PromptActivationPredictor: the program was exported with a static sequence length, "
                "so it cannot read instructions of other lengths; export with dynamic_shapes='seq'"
            )
        self.probe, self.widths = activation_probe(ep)
        self.counts = keep_counts(self.widths, keep)
        self.eps = eps
        # a decode step: the instruction is a prefill at positions 0..n-1, written into the
        # probe's own copy of the cache (the program's cache is shared by its derived programs)
        self.cache_len = None
        if _cache_placeholders(ep):
            self.cache_len = max_cache_len(ep)
            _own_state(self.probe, ep)

    def _inputs(self, instruction_ids: torch.Tensor) -> tuple:
        if self.cache_len is None:
            return (instruction_ids,)
        n = instruction_ids.shape[-1]
        if instruction_ids.ndim != 2 or instruction_ids.shape[0] != 1:
            raise InstructionError(f"a decode-step program reads one instruction at a time: instruction ids "
                                   f"must have shape [1, n], got {list(instruction_ids.shape)}")
        if n > self.cache_len:
            raise InstructionError(f"the instruction has {n} tokens; the decode-step program's KV cache "
                                   f"holds {self.cache_len}")
        return instruction_ids, torch.arange(n)

    def channel_scores(self, instruction_ids: torch.Tensor) -> list[torch.Tensor]:
        """GRIFFIN's per-channel score for every block (higher = keep)."""
        scores = []
        # a weightless probe (a model captured from its checkpoint) runs layer by layer,
        # each weight read from the checkpoint while its node runs (weights.stream)
        for h, w in zip(stream.run(self.probe, *self._inputs(instruction_ids)), self.widths):
            a = h.reshape(-1, w).float()
            a = a / a.norm(dim=-1, keepdim=True).clamp_min(self.eps)
            scores.append(a.norm(dim=0))
        return scores

    def forward(self, instruction_ids: torch.Tensor) -> list[torch.Tensor]:
        masks = []
        for s, k in zip(self.channel_scores(instruction_ids), self.counts):
            idx = torch.topk(s, k).indices
            masks.append(torch.zeros_like(s).index_fill(0, idx, 1.0))
        return masks
